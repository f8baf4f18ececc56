"""What the operators need to run as a service: the training queue and the links to what tasks produced."""

import pytest
from airflow.sdk import DAG

from conftest import ROOT
from operators import ExportServingModelOperator, FetchDatasetOperator, TrainModelOperator
from operators.links import StoreLink, browser_url

SPEC = ROOT / "include" / "penguins.yaml"


def test_training_runs_on_the_gpu_queue_by_default(monkeypatch):
    monkeypatch.delenv("AIRFLOW__SHARDLINE__GPU_QUEUE", raising=False)
    assert TrainModelOperator(task_id="train", spec=SPEC).queue == "gpu"
    assert FetchDatasetOperator(task_id="fetch", spec=SPEC).queue != "gpu"
    monkeypatch.setenv("AIRFLOW__SHARDLINE__GPU_QUEUE", "cuda-a100")
    assert TrainModelOperator(task_id="train", spec=SPEC).queue == "cuda-a100"


def test_training_queue_can_be_set_per_task_and_per_dag():
    assert TrainModelOperator(task_id="train", spec=SPEC, queue="cpu-large").queue == "cpu-large"
    with DAG("per_dag_queue", schedule=None, default_args={"queue": "cpu-large"}):
        assert TrainModelOperator(task_id="train", spec=SPEC).queue == "cpu-large"


def test_links_open_local_paths_s3_and_a_configured_store_browser(monkeypatch, tmp_path):
    assert browser_url(str(tmp_path / "raw" / "manifest.json")) == (tmp_path / "raw" / "manifest.json").as_uri()
    assert browser_url("s3://bucket/runs/penguins/r1/train/tensorboard") == (
        "https://s3.console.aws.amazon.com/s3/buckets/bucket?prefix=runs/penguins/r1/train/tensorboard"
    )
    monkeypatch.setenv("AIRFLOW__SHARDLINE__STORE_URI", "s3://shardline")
    monkeypatch.setenv("AIRFLOW__SHARDLINE__STORE_BROWSER_URL", "http://localhost:9001/browser/shardline")
    assert browser_url("s3://shardline/serving/penguins/1795564800") == (
        "http://localhost:9001/browser/shardline/serving/penguins/1795564800"
    )
    assert browser_url("s3://elsewhere/x") == "https://s3.console.aws.amazon.com/s3/buckets/elsewhere?prefix=x"


@pytest.mark.parametrize("result, expected", [
    ({"version_uri": "/store/serving/penguins/7", "version": 7}, "file:///store/serving/penguins/7"),
    (None, ""),  # a skipped export returns nothing: no link rather than a broken one
])
def test_link_reads_the_uri_from_the_task_result(monkeypatch, result, expected):
    from airflow.sdk.execution_time import xcom

    asked = []
    monkeypatch.setattr(xcom.XCom, "get_value", classmethod(lambda cls, ti_key, key: asked.append(key) or result))
    link = ExportServingModelOperator.operator_extra_links[0]
    assert link.get_link(ExportServingModelOperator(task_id="export", spec=SPEC), ti_key=object()) == expected
    assert asked == ["return_value"]


def test_every_link_has_its_own_xcom_key():
    links = [link for op in (FetchDatasetOperator, TrainModelOperator, ExportServingModelOperator)
             for link in op.operator_extra_links]
    assert all(isinstance(link, StoreLink) for link in links)
    keys = {link.name: link.xcom_key for link in links}
    assert keys["TensorBoard logs"] == "_link_tensorboard_logs"
    assert len(set(keys.values())) == len(keys)


def test_source_uri_with_partition_fetches_that_days_delivery(tmp_path):
    import collections
    import datetime
    from types import SimpleNamespace

    import palmerpenguins

    palmerpenguins.load_penguins().head(40).to_csv(tmp_path / "penguins-2026-11-25.csv", index=False)
    operator = FetchDatasetOperator(task_id="fetch", spec=SPEC, store_uri=str(tmp_path / "store"),
                                    partition="2026-11-25", source_uri=str(tmp_path / "penguins-{partition}.csv"))
    logical = datetime.datetime(2026, 11, 25, tzinfo=datetime.timezone.utc)
    context = {"dag_run": SimpleNamespace(logical_date=logical, run_after=logical),
               "outlet_events": collections.defaultdict(SimpleNamespace)}
    result = operator.execute(context)
    assert result["rows"] == 40 and result["source"] == str(tmp_path / "penguins-2026-11-25.csv")
