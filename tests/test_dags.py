"""DAG files: they parse fast, without TensorFlow, and describe a usable trigger form."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
TRAINING_TASKS = ["fetch", "validate", "statistics", "shard", "adapt", "train", "evaluate", "export", "promote", "report"]

MEASURE_IMPORT = """
import json, sys, time, importlib.util
from airflow.sdk import DAG, Asset, BaseOperator, Param, chain  # what the DAG processor has loaded already
path = sys.argv[1]
started = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
seconds = time.perf_counter() - started
heavy = sorted(m for m in ("tensorflow", "keras", "tensorflow_datasets", "pandas", "pyarrow") if m in sys.modules)
print(json.dumps({"seconds": seconds, "heavy": heavy}))
"""


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.name for p in DAG_FILES])
def test_dag_file_parses_fast_without_tensorflow(path):
    completed = subprocess.run([sys.executable, "-c", MEASURE_IMPORT, str(path)], capture_output=True, text=True,
                               check=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert result["seconds"] < 0.5


def test_dagbag_has_no_import_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert {"penguins", "housing", "sms_spam"} <= set(bag.dag_ids)


def test_penguins_dag_shape_and_trigger_form():
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags" / "penguins.py")).dags["penguins"]
    assert [t.task_id for t in dag.topological_sort()] == TRAINING_TASKS
    assert dag.catchup is False
    params = dag.params
    for name in ("epochs", "batch_size", "learning_rate", "early_stopping_patience", "model", "force_retrain"):
        param = params.get_param(name)
        assert param.schema.get("type") and param.description, name
    assert params.get_param("epochs").schema["minimum"] == 1
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError):
        params.get_param("epochs").resolve(0)


def test_housing_dag_trigger_form_picks_model_loss_loop_and_landing_prefix():
    from airflow.dag_processing.dagbag import DagBag

    from tfjobs import choices

    dag = DagBag(dag_folder=str(ROOT / "dags" / "housing.py")).dags["housing"]
    tasks = TRAINING_TASKS.copy()
    tasks[tasks.index("train"):tasks.index("train")] = ["tune_plan", "tune", "tune_best"]
    assert [t.task_id for t in dag.topological_sort()] == tasks
    params = dag.params
    model = params.get_param("model").schema
    # A DAG that can tune offers empty (None: the spec's or the tuned value) besides each choice.
    assert model["enum"] == [None, *sorted(choices.MODEL_KINDS)] and set(model["values_display"]) == set(model["enum"])
    assert params.get_param("loss").schema["enum"] == [None, "mse", "huber"]
    assert "threshold" in params.get_param("loss").schema["values_display"]["huber"]
    assert params.get_param("loop").schema["enum"] == [None, "custom", "fit"]
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="crossentropy"):
        params.get_param("loss").resolve("crossentropy")  # not a regression loss
    assert "{partition}" in params.get_param("source_uri").description
    train, fetch = dag.get_task("train"), dag.get_task("fetch")
    assert train.hyperparameters["loss"] == "{{ params.loss or '' }}" and train.tuned_by == "tune_best"
    assert fetch.source_uri == "{{ params.source_uri or '' }}"


def test_the_form_refuses_credentials_in_the_source_and_takes_a_delivery_deadline():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    dag = DagBag(dag_folder=str(ROOT / "dags" / "housing.py")).dags["housing"]
    params, fetch = dag.params, dag.get_task("fetch")
    with pytest.raises(ParamValidationError):
        params.get_param("source_uri").resolve("https://user:secret@landing.example.com/{partition}.csv")
    assert params.get_param("source_uri").resolve("s3://landing/housing/{partition}.csv")
    for good in ("", "6h", "1h30m", "2026-11-26T06:00:00Z", None):
        params.get_param("delivery_deadline").resolve(good)
    for bad in ("6 hours", "tomorrow"):
        with pytest.raises(ParamValidationError):
            params.get_param("delivery_deadline").resolve(bad)
    with pytest.raises(ParamValidationError):
        params.get_param("epoch_timeout").resolve("")
    assert (fetch.source_conn_id, fetch.deadline, fetch.poke_interval) == (
        "{{ params.source_conn_id or '' }}", "{{ params.delivery_deadline or '' }}",
        "{{ params.delivery_poke_interval or '' }}")
    assert dag.get_task("train").epoch_timeout == "{{ params.epoch_timeout }}"


def test_penguins_form_offers_only_classification_losses():
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags" / "penguins.py")).dags["penguins"]
    assert dag.params.get_param("loss").schema["enum"] == ["crossentropy"]


@pytest.mark.parametrize("dag_id", ["digits", "mnist"])
def test_the_image_dags_run_the_same_pipeline_and_the_folder_dag_asks_for_a_folder(dag_id):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags" / f"{dag_id}.py")).dags[dag_id]
    assert [t.task_id for t in dag.topological_sort()] == TRAINING_TASKS
    source = dag.params.get_param("source_uri").schema
    assert source["title"] == ("Source folder" if dag_id == "digits" else "Source CSV")


def test_housing_tunes_when_the_run_asks_with_runners_mapped_on_the_gpu_queue():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    dag = DagBag(dag_folder=str(ROOT / "dags" / "housing.py")).dags["housing"]
    params = dag.params
    assert params["tuning"] is False  # the daily run does not tune
    assert params.get_param("tuning_trials").resolve(None) is None and params.get_param("tuning_trials").resolve(12)
    with pytest.raises(ParamValidationError):
        params.get_param("tuning_parallel").resolve(0)
    # Training Params start empty: the spec's value, or the tuned one; what a person types wins.
    for name in ("epochs", "batch_size", "learning_rate", "model", "loss"):
        assert params[name] is None and "Empty: the spec's" in params.get_param(name).description, name
    assert "tuned value when tuning" in params.get_param("learning_rate").description
    assert "tuned" not in params.get_param("epochs").description  # not searched
    runners, best = dag.get_task("tune"), dag.get_task("tune_best")
    assert runners.queue == "gpu" and runners.retry_delay.total_seconds() == 30
    assert [t.task_id for t in runners.upstream_list] == ["tune_plan"] and best.trigger_rule == "none_failed"
    assert dag.get_task("tune_plan").enabled == "{{ params.tuning }}"


def test_penguins_has_no_tuning_steps_and_keeps_its_filled_in_form():
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags" / "penguins.py")).dags["penguins"]
    assert "tuning" not in dag.params and dag.params["epochs"] == 60 and dag.get_task("train").tuned_by is None


def test_sms_spam_form_picks_the_text_family_and_storage_for_every_step():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.exceptions import ParamValidationError

    dag = DagBag(dag_folder=str(ROOT / "dags" / "sms_spam.py")).dags["sms_spam"]
    params = dag.params
    mode, storage = params.get_param("message_output_mode"), params.get_param("message_storage")
    assert mode.value == "int" and mode.schema["enum"] == ["int", "multi_hot", "count", "tf_idf"]
    assert storage.schema["enum"] == ["example", "sequence_example"] and "SequenceExample" in storage.description
    with pytest.raises(ParamValidationError):
        mode.resolve("bag_of_words")
    # Every step reads the spec with the run's choices, or the steps would disagree on the data.
    for task in dag.tasks:
        assert task.feature_options == {"message": {"output_mode": "{{ params.message_output_mode }}",
                                                    "storage": "{{ params.message_storage }}"}}, task.task_id
        assert "feature_options" in task.template_fields
