"""The tuning steps as Airflow sees them: the trigger form, the switch, the study's database, train's overrides."""

import collections
import datetime
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from conftest import ROOT
from operators.train import TrainModelOperator
from operators.tune import PickBestTrialOperator, TuneOperator, TunePlanOperator, sqlalchemy_url, tuning_params
from tfjobs.spec import load_spec

SPEC = ROOT / "include" / "housing.yaml"
LOGICAL = datetime.datetime(2026, 11, 25, tzinfo=datetime.timezone.utc)


def context(**ti):
    return {"dag_run": SimpleNamespace(logical_date=LOGICAL, run_after=LOGICAL),
            "outlet_events": collections.defaultdict(SimpleNamespace), "ti": SimpleNamespace(**ti)}


def test_an_empty_param_is_told_apart_from_one_the_user_set():
    params = tuning_params(load_spec(SPEC))
    learning_rate = params["learning_rate"]
    assert learning_rate.value is None and learning_rate.resolve(None) is None
    assert learning_rate.resolve(0.01) == 0.01
    assert "Empty: the spec's (0.003), or the tuned value when tuning." in learning_rate.description
    model = params["model"]
    assert model.resolve(None) is None and model.resolve("mlp") == "mlp"
    assert model.schema["values_display"][None].startswith("Empty: the spec's (wide_deep)")
    assert params["tuning"].value is False and tuning_params(load_spec(SPEC), tuning=True)["tuning"].value is True


def test_train_leaves_an_empty_override_to_the_spec_or_the_search(tmp_path):
    train = TrainModelOperator(task_id="train", spec=SPEC, store_uri=str(tmp_path),
                               hyperparameters={"epochs": "", "learning_rate": "0.02", "batch_size": None})
    assert train.explicit == {"learning_rate": "0.02"}
    assert train.training_timeout() == datetime.timedelta(minutes=30) + 30 * datetime.timedelta(minutes=10)


def test_a_run_that_does_not_tune_maps_no_runner_and_trains_on_the_specs_settings(tmp_path):
    common = {"spec": SPEC, "store_uri": str(tmp_path), "partition": "2026-11-25", "enabled": "False"}
    assert TunePlanOperator(task_id="tune_plan", **common).execute(context()) == []
    assert PickBestTrialOperator(task_id="tune_best", **common).execute(context()) == {"tuned": False}


def test_a_spec_without_a_search_cannot_tune(tmp_path):
    plan = TunePlanOperator(task_id="tune_plan", spec=ROOT / "include" / "penguins.yaml", store_uri=str(tmp_path),
                            partition="2026-11-25")
    with pytest.raises(AirflowFailException, match="has no tuning block"):
        plan.execute(context())


def test_a_runners_time_limit_grows_with_its_share_of_the_trials():
    runner = TuneOperator(task_id="tune", spec=SPEC, epoch_timeout="1m", trials="10", parallel="2")
    runner.render_template_fields(context())
    # 30 minutes, plus 4 epochs per trial for ceil(10 / 2) + 1 trials.
    assert runner.execution_timeout == datetime.timedelta(minutes=30 + 4 * 6)
    assert runner.queue == "gpu" and runner.retry_delay == datetime.timedelta(seconds=30)


def test_the_study_database_comes_from_a_connection_or_sits_beside_a_local_store(monkeypatch, tmp_path):
    from operators.tune import tuning_storage

    monkeypatch.delenv("AIRFLOW__SHARDLINE__TUNING_CONN_ID", raising=False)
    url, shown = tuning_storage(str(tmp_path))
    assert url == f"sqlite:///{tmp_path / 'tuning' / 'studies.sqlite3'}" and shown == url.removeprefix("sqlite:///")
    with pytest.raises(AirflowFailException, match="tuning_conn_id"):
        tuning_storage("s3://bucket/shardline")
    monkeypatch.setenv("AIRFLOW__SHARDLINE__TUNING_CONN_ID", "studies")
    monkeypatch.setenv("AIRFLOW_CONN_STUDIES", "postgresql://optuna:p%40ss@db.internal:5432/shardline_tuning")
    url, shown = tuning_storage("s3://bucket/shardline")
    assert url == "postgresql+psycopg2://optuna:p%40ss@db.internal:5432/shardline_tuning"
    assert shown == "connection studies"  # results name the connection, never its password
    with pytest.raises(AirflowFailException, match="a study needs a database"):
        sqlalchemy_url(SimpleNamespace(conn_id="web", conn_type="http", host="x", login="", password="", port=None,
                                       schema=""))
