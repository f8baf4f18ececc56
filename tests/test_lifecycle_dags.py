"""The lifecycle's DAGs: scoring reuses the training operators, Assets connect them, rollback is a form."""

import datetime
from types import SimpleNamespace

import pytest

from conftest import ROOT

STORE = "/tmp/shardline-store"


@pytest.fixture(scope="module")
def dags(monkeypatch_module):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch_module.setenv("AIRFLOW__SHARDLINE__STORE_URI", STORE)
    return DagBag(dag_folder=str(ROOT / "dags")).dags


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_scoring_dag_is_the_training_operators_plus_scoring(dags):
    from operators import FetchDatasetOperator, ValidateDatasetOperator
    from operators.score import ScoreDeliveryOperator
    from operators.statistics import ComputeStatisticsOperator

    for name in ("penguins", "housing"):
        training, scoring = dags[name], dags[f"{name}_scoring"]
        assert [t.task_id for t in scoring.topological_sort()] == ["fetch", "validate", "statistics", "score", "report"]
        kinds = {type(t) for t in scoring.tasks}
        assert {FetchDatasetOperator, ValidateDatasetOperator, ComputeStatisticsOperator} <= kinds
        assert kinds - {type(t) for t in training.tasks} == {ScoreDeliveryOperator}
        assert scoring.get_task("validate").label_required is False
        assert {t.dataset for t in scoring.tasks} == {f"{name}_scoring"}  # its deliveries, apart from training's
        assert scoring.get_task("report").is_teardown and scoring.params["source_uri"] == \
            f"{{store}}/landing/{name}/{{partition}}.csv"


def test_a_new_production_model_triggers_a_re_score_through_an_asset(dags):
    from airflow.sdk import Asset

    production = Asset(name="penguins.production", uri=f"file://{STORE}/serving/penguins/production.json",
                       group="shardline")
    promote, score = dags["penguins"].get_task("promote"), dags["penguins_scoring"].get_task("score")
    assert production in promote.outlets and production in dags["penguins_rollback"].get_task("rollback").outlets
    assert score.inlets == [production] and [a.uri for a in score.outlets] == [f"file://{STORE}/predictions/penguins"]
    schedule = dags["penguins_scoring"].timetable
    assert production.uri in str(schedule) and "0 0 * * *" in str(schedule)  # daily, or when production moves
    evaluate = dags["penguins"].get_task("evaluate")
    assert evaluate.force == "{{ params.get('force_promotion', False) }}" and evaluate.outlets[0].name == "penguins.evaluations"


def test_the_training_report_runs_whatever_happened_and_leaves_the_run_state_to_the_pipeline(dags):
    report = dags["housing"].get_task("report")
    assert report.is_teardown and not report.on_failure_fail_dagrun
    assert set(report.upstream_task_ids) == {t.task_id for t in dags["housing"].tasks} - {"report"}
    links = {link.name for task in ("evaluate", "export") for link in dags["housing"].get_task(task).operator_extra_links}
    assert "Run report" in links


def test_the_rollback_form_takes_an_optional_version_and_a_reason(dags):
    from airflow.sdk.exceptions import ParamValidationError

    dag = dags["housing_rollback"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual trigger only
    assert dag.params.get_param("version").resolve(None) is None and dag.params.get_param("version").resolve(3) == 3
    with pytest.raises(ParamValidationError):
        dag.params.get_param("version").resolve(0)
    assert dags["housing"].params.get_param("force_promotion").resolve(True) is True


def test_force_comes_with_who_from_the_run_and_when():
    from operators.base import forced_by

    run = SimpleNamespace(triggering_user_name="alice", run_id="manual__x", run_type="manual")
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    forced = forced_by({"dag_run": run})
    assert (forced["by"], forced["run_id"]) == ("alice", "manual__x")
    assert before <= datetime.datetime.fromisoformat(forced["at"]) <= datetime.datetime.now(datetime.timezone.utc)
    assert forced_by({"dag_run": SimpleNamespace(triggering_user_name=None, run_type="scheduled")})["by"] == \
        "scheduled run"


def test_a_rollback_overtaken_by_a_promotion_fails_without_a_retry(monkeypatch):
    """A retry would read the new production and roll *it* back: the operator fails the task for good."""
    from airflow.sdk.exceptions import AirflowFailException

    from operators.promote import RollbackModelOperator
    from tfjobs import rollback as rollback_module

    def overtaken(*args, **kwargs):
        raise rollback_module.ProductionChangedError("Production of s3://b/serving/m changed from version 1 to 2")

    operator = RollbackModelOperator(task_id="rollback", spec=str(ROOT / "include" / "housing.yaml"))
    monkeypatch.setattr(operator, "load_spec", lambda: None)
    monkeypatch.setattr(operator, "layout", lambda context, spec: SimpleNamespace(serving="s3://b/serving/m"))
    monkeypatch.setattr(rollback_module, "rollback", overtaken)
    run = SimpleNamespace(triggering_user_name="bob", run_id="manual__x", run_type="manual")
    with pytest.raises(AirflowFailException, match="ProductionChangedError: Production of .* changed from version 1"):
        operator.execute({"dag_run": run})
