"""Operators, called the way Airflow calls them: execute(context)."""

import collections
import datetime
import json
from types import SimpleNamespace

import pytest
from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

from conftest import ROOT
from operators import FetchDatasetOperator, ShardToTFRecordOperator, ValidateDatasetOperator
from operators.base import ShardlineOperator

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
    assert {"store_uri", "partition", "source_uri", "landing_uri"} <= set(FetchDatasetOperator.template_fields)
