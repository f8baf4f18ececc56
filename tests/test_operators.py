"""Operators, called the way Airflow calls them: execute(context)."""

import base64
import collections
import datetime
import json
import shutil
import time
from types import SimpleNamespace

import pytest
from airflow.sdk import DAG, Asset
from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException

from conftest import ROOT, loopback_http
from operators import FetchDatasetOperator, ShardToTFRecordOperator, TrainModelOperator, ValidateDatasetOperator
from operators.base import ShardlineOperator
from operators.params import training_params
from operators.pipeline import training_pipeline
from tfjobs.deadlines import utc_now, utc_text
from tfjobs.spec import load_spec

SPEC = ROOT / "include" / "penguins.yaml"
LOGICAL = datetime.datetime(2026, 11, 25, tzinfo=datetime.timezone.utc)


def context(logical_date=LOGICAL):
    return {
        "dag_run": SimpleNamespace(logical_date=logical_date, run_after=LOGICAL + datetime.timedelta(hours=3)),
        "outlet_events": collections.defaultdict(SimpleNamespace),
    }


def run(operator_class, store, **kwargs):
    operator = operator_class(task_id=operator_class.__name__, spec=SPEC, store_uri=store,
                              partition="2026-11-25", **kwargs)
    ctx = context()
    result = operator.execute(ctx)
    json.dumps(result)  # XCom takes it
    return operator, ctx, result


def penguins_csv(tmp_path, transform):
    import palmerpenguins

    frame = transform(palmerpenguins.load_penguins())
    path = tmp_path / "penguins.csv"
    frame.to_csv(path, index=False)
    return str(path)


def test_rows_without_label_are_quarantined_and_counted(tmp_path):
    def blank_labels(frame):
        frame.loc[:4, "species"] = None
        return frame

    store = str(tmp_path / "store")
    run(FetchDatasetOperator, store, source_uri=penguins_csv(tmp_path, blank_labels))
    operator, ctx, result = run(ValidateDatasetOperator, store)
    assert (result["rows_in"], result["rows_valid"], result["rows_quarantined"]) == (344, 339, 5)
    assert result["reasons"] == {"species: missing label": 5}
    asset = operator.outlets[0]
    assert isinstance(asset, Asset) and asset.uri.endswith("/validated/penguins")
    assert ctx["outlet_events"][asset].extra["rows_quarantined"] == 5


def test_csv_without_the_label_column_fails_without_retry(tmp_path):
    store = str(tmp_path / "store")
    run(FetchDatasetOperator, store, source_uri=penguins_csv(tmp_path, lambda f: f.drop(columns=["species"])))
    with pytest.raises(AirflowFailException, match=r"'species' \(the label\) missing"):
        run(ValidateDatasetOperator, store)


def test_results_are_small_and_name_uris(tmp_path):
    store = str(tmp_path / "store")
    _, _, fetched = run(FetchDatasetOperator, store)
    run(ValidateDatasetOperator, store)
    _, _, sharded = run(ShardToTFRecordOperator, store)
    assert fetched["manifest_uri"] == f"{store}/raw/penguins/2026-11-25/manifest.json"
    assert sharded["manifest_uri"] == f"{store}/shards/penguins/2026-11-25/manifest.json"
    assert sum(sharded["records"].values()) == 344
    assert len(json.dumps(sharded)) < 1000


def test_missing_store_configuration_names_the_setting(monkeypatch):
    monkeypatch.delenv("AIRFLOW__SHARDLINE__STORE_URI", raising=False)
    operator = FetchDatasetOperator(task_id="fetch", spec=SPEC, partition="2026-11-25")
    assert operator.outlets == []
    with pytest.raises(AirflowFailException, match="AIRFLOW__SHARDLINE__STORE_URI"):
        operator.execute(context())


def test_run_key_and_version_come_from_the_logical_date(tmp_path):
    operator = FetchDatasetOperator(task_id="fetch", spec=SPEC, store_uri=str(tmp_path), partition="2026-11-25")
    spec = operator.load_spec()
    assert operator.layout(context(), spec).run == "2026-11-25T000000"
    assert ShardlineOperator.version(context()) == int(LOGICAL.timestamp())
    # A run triggered without a logical date falls back to its run_after.
    assert operator.layout(context(logical_date=None), spec).run == "2026-11-25T030000"


def test_templated_fields_are_declared():
    assert {"store_uri", "partition", "source_uri"} <= set(FetchDatasetOperator.template_fields)


def execute_with_reschedules(operator, ctx, between_pokes=lambda: None):
    """execute() as the scheduler runs a task in reschedule mode: again at each reschedule date.

    Returns the result and the number of pokes; ``between_pokes`` runs after each reschedule.
    """
    pokes = 0
    while True:
        pokes += 1
        try:
            return operator.execute(ctx), pokes
        except AirflowRescheduleException as reschedule:
            between_pokes()
            wait = (reschedule.reschedule_date - utc_now()).total_seconds()
            assert wait < 5, f"rescheduled {wait:.0f} s ahead: the tests poke every second at most"
            time.sleep(max(0.0, wait))


def landing_fetch(tmp_path, source_uri, **kwargs):
    return FetchDatasetOperator(task_id="fetch", spec=SPEC, store_uri=str(tmp_path / "store"), partition="2026-11-25",
                                source_uri=source_uri, **kwargs)


def test_a_late_delivery_is_waited_for_and_fetched(tmp_path):
    delivery = penguins_csv(tmp_path, lambda frame: frame)
    (tmp_path / "landing").mkdir()
    operator = landing_fetch(tmp_path, f"{tmp_path}/landing/{{partition}}.csv", poke_interval="0.5s",
                             deadline=utc_text(utc_now() + datetime.timedelta(hours=1)))
    started = time.monotonic()
    result, pokes = execute_with_reschedules(
        operator, context(), between_pokes=lambda: shutil.copy(delivery, tmp_path / "landing" / "2026-11-25.csv"))
    assert (pokes, result["rows"]) == (2, 344)
    assert time.monotonic() - started >= 0.5  # it waited for the next poke


def test_no_delivery_by_the_deadline_fails_naming_the_deadline(tmp_path):
    deadline = (utc_now() + datetime.timedelta(seconds=2)).replace(microsecond=0)  # 1-2 s away
    operator = landing_fetch(tmp_path, f"{tmp_path}/{{partition}}.csv", deadline=utc_text(deadline), poke_interval="0.5s")
    pokes = []
    with pytest.raises(AirflowFailException, match=f"No delivery for 2026-11-25 by {utc_text(deadline)}: expected"):
        execute_with_reschedules(operator, context(), between_pokes=lambda: pokes.append(utc_now()))
    assert len(pokes) >= 2 and pokes[-1] < deadline <= utc_now()
    assert not (tmp_path / "store" / "raw").exists()


def test_source_conn_id_authenticates_every_poke_and_the_download(tmp_path, monkeypatch):
    with loopback_http() as server:
        host, port = server.url("/").split("/")[2].split(":")
        monkeypatch.setenv("AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES", server.url("/"))
        monkeypatch.setenv("AIRFLOW_CONN_LANDING_HTTP", json.dumps(
            {"conn_type": "http", "host": host, "port": int(port), "login": "shardline", "password": "s3cret"}))
        operator = landing_fetch(tmp_path, server.url("/penguins-{partition}.csv"), source_conn_id="landing_http",
                                 deadline=utc_text(utc_now() + datetime.timedelta(hours=1)), poke_interval="0.1s")

        def deliver():
            server.files["/penguins-2026-11-25.csv"] = open(penguins_csv(tmp_path, lambda frame: frame), "rb").read()

        result, pokes = execute_with_reschedules(operator, context(), between_pokes=deliver)
        assert (pokes, result["rows"]) == (2, 344)
        basic = "Basic " + base64.b64encode(b"shardline:s3cret").decode()
        assert [(m, h.get("Authorization")) for m, _, h in server.requests] == [
            ("HEAD", basic), ("HEAD", basic), ("GET", basic)]
        assert "s3cret" not in json.dumps(result)


def test_source_conn_id_must_exist_and_name_the_sources_host(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_OTHER_HOST", json.dumps(
        {"conn_type": "http", "host": "https://landing.example.com", "login": "u", "password": "p"}))
    monkeypatch.setenv("AIRFLOW_CONN_NO_HOST", json.dumps({"conn_type": "http", "login": "u", "password": "p"}))
    source = "http://127.0.0.1:9/penguins.csv"  # never contacted: every case fails before a request
    with pytest.raises(AirflowFailException, match="not at https://landing.example.com:443, the only origin"):
        landing_fetch(tmp_path, source, source_conn_id="other_host").execute(context())
    with pytest.raises(AirflowFailException, match="'no_host' has no host. Set it to the server"):
        landing_fetch(tmp_path, source, source_conn_id="no_host").execute(context())
    with pytest.raises(AirflowFailException, match="'missing' is not an Airflow connection.*AIRFLOW_CONN_MISSING"):
        landing_fetch(tmp_path, source, source_conn_id="missing").execute(context())


def test_credentials_in_source_uri_are_refused_pointing_to_a_connection(tmp_path):
    with loopback_http() as server:
        source = server.url("/penguins.csv").replace("://", "://shardline:s3cret@")
        with pytest.raises(AirflowFailException, match="carries credentials.*HTTP connection.*source_conn_id") as err:
            landing_fetch(tmp_path, source).execute(context())
        assert "s3cret" not in str(err.value) and server.requests == []


def test_every_step_has_a_time_limit_and_trainings_grows_with_the_epochs():
    with DAG("limits", schedule=None, params=training_params(load_spec(SPEC)), default_args={"spec": SPEC}) as dag:
        training_pipeline()
    assert all(task.execution_timeout == datetime.timedelta(hours=1) for task in dag.tasks if task.task_id != "train")
    train = dag.get_task("train")
    assert train.execution_timeout is None  # until the epochs are known
    train.render_template_fields({"params": {**dag.params.dump(), "epochs": 10_000, "epoch_timeout": "1m"},
                                  "dag_run": context()["dag_run"]})
    assert train.execution_timeout == datetime.timedelta(minutes=30 + 10_000)
    # Without the Param: the spec's 60 epochs, 10 minutes each.
    spec_default = TrainModelOperator(task_id="train", spec=SPEC, partition="2026-11-25")
    spec_default.render_template_fields({})
    assert spec_default.execution_timeout == datetime.timedelta(minutes=30 + 60 * 10)
    with pytest.raises(AirflowFailException, match="epoch_timeout 'ten minutes'"):
        TrainModelOperator(task_id="train", spec=SPEC, partition="x", epoch_timeout="ten minutes").render_template_fields({})


def test_a_time_limit_set_on_the_task_or_the_dag_wins():
    hour = datetime.timedelta(hours=1)
    with DAG("limits", schedule=None, default_args={"spec": SPEC, "execution_timeout": 2 * hour}):
        train = TrainModelOperator(task_id="train", partition="2026-11-25")
        fetch = FetchDatasetOperator(task_id="fetch", execution_timeout=3 * hour)
    train.render_template_fields({})
    assert (train.execution_timeout, fetch.execution_timeout) == (2 * hour, 3 * hour)


def test_feature_options_override_the_spec_for_the_run_and_bad_ones_fail_the_task(tmp_path):
    from operators import AdaptPreprocessingOperator

    operator = AdaptPreprocessingOperator(task_id="adapt", spec=SPEC, store_uri=str(tmp_path),
                                          feature_options={"island": {"encoding": "embedding", "embedding_dim": "3"}})
    island = operator.load_spec().feature("island")
    assert (island.options.encoding, island.options.embedding_dim) == ("embedding", 3)
    assert operator.load_spec().fingerprint() != load_spec(SPEC).fingerprint()
    operator.feature_options = {"island": {"encoding": "hashed"}}
    with pytest.raises(AirflowFailException, match=r"features\.island\.encoding: 'hashed' is not one of"):
        operator.load_spec()
