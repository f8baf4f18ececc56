"""The penguins DAG end to end with its store on S3, through a proxy that injects faults.

The endpoint is moto's S3 server on loopback, reached over HTTP by boto3 through
the Amazon provider's hook (the Airflow connection holds the key and the endpoint).
One in ten requests gets a 503 SlowDown, a 500, or a dropped connection.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT
from s3_server import FaultyProxy, moto_s3
from tfjobs.storage import s3
from tfjobs.storage.store import read_json, store_for

pytestmark = pytest.mark.slow
DATE = "2026-11-25"
PREFIX = "s3://shardline/e2e"


@pytest.fixture(scope="module")
def s3_airflow(tmp_path_factory):
    """An Airflow home whose store is the S3 endpoint behind the faulty proxy; ``dags_test(dag_id, date)`` runs."""
    home = tmp_path_factory.mktemp("airflow-s3")
    with moto_s3() as endpoint, FaultyProxy(endpoint.url, share=0.1, seed=7) as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__SHARDLINE__STORE_URI": PREFIX,
            "AIRFLOW_CONN_SHARDLINE_STORE": endpoint.airflow_connection(proxy.url),
            "PYTHONPATH": str(ROOT),
        })
        airflow = str(Path(sys.executable).parent / "airflow")
        subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)

        def dags_test(dag_id, date):
            return subprocess.run([airflow, "dags", "test", dag_id, date], env=env, capture_output=True, text=True,
                                  cwd=ROOT)

        s3.configure(lambda: endpoint.client(), source="the test endpoint")  # this process reads the results
        try:
            yield SimpleNamespace(dags_test=dags_test, endpoint=endpoint, proxy=proxy)
        finally:
            s3.configure()


@pytest.fixture(scope="module")
def s3_run(s3_airflow):
    return s3_airflow.dags_test("penguins", DATE), s3_airflow.endpoint, s3_airflow.proxy


def test_dag_completes_on_s3_despite_faults(s3_run):
    completed, _, proxy = s3_run
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert sum(proxy.injected.values()) >= 10 and len(proxy.injected) == len(FaultyProxy.FAULTS)


def test_s3_shards_are_byte_identical_to_the_local_run(s3_run, penguins_pipeline):
    manifest_uri = f"{PREFIX}/shards/penguins/{DATE}/manifest.json"
    on_s3 = read_json(manifest_uri)
    local = read_json(penguins_pipeline.shard.manifest_uri)
    assert on_s3["splits"] == local["splits"]  # per-split counts and every shard's SHA-256
    import hashlib

    for split in on_s3["splits"].values():
        for shard in split["shards"]:
            data = store_for(PREFIX).read_bytes(f"{PREFIX}/shards/penguins/{DATE}/{shard['file']}")
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]


def test_s3_run_meets_the_same_quality_bar_and_publishes_a_version(s3_run):
    metrics = read_json(f"{PREFIX}/runs/penguins/2026-11-25T000000/evaluate/metrics.json")
    assert metrics["blessed"] and metrics["metrics"]["accuracy"] >= 0.95
    version = f"{PREFIX}/serving/penguins/1795564800"
    names = {uri[len(version) + 1:] for uri in store_for(version).list(version)}
    assert {"saved_model.pb", "model.keras", "shardline.json", "variables/variables.index"} <= names
    # Published through a staging prefix and server-side copies, under faults; the staging prefix is gone.
    pointer = {f"{PREFIX}/serving/penguins/{n}" for n in ("production.json", "models.config")}
    assert set(store_for(PREFIX).list(f"{PREFIX}/serving/penguins")) == {f"{version}/{n}" for n in names} | pointer


def test_the_scoring_dag_scores_a_landing_file_on_s3(s3_run, s3_airflow):
    """penguins_scoring on the same S3 store: the delivery under <store>/landing, predictions beside the data."""
    import io

    import palmerpenguins
    import pandas as pd

    day = "2026-11-26"
    delivery = palmerpenguins.load_penguins().sample(150, random_state=8).drop(columns=["species"]).astype(str)
    delivery.iloc[[10], delivery.columns.get_loc("bill_depth_mm")] = "deep"
    store = store_for(PREFIX)
    store.write_bytes(f"{PREFIX}/landing/penguins/{day}.csv", delivery.to_csv(index=False).encode())
    completed = s3_airflow.dags_test("penguins_scoring", day)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    manifest = read_json(f"{PREFIX}/predictions/penguins/{day}/manifest.json")
    predictions = pd.read_parquet(io.BytesIO(store.read_bytes(f"{PREFIX}/predictions/penguins/{day}/predictions.parquet")))
    assert manifest["rows"] == len(predictions) == 149 and manifest["rows_quarantined"] == 1
    assert predictions["_line"].tolist() == [n for n in range(2, 152) if n != 12]
    assert (predictions["model_version"] == 1795564800).all()
    quarantine = store.read_bytes(f"{PREFIX}/validated/penguins_scoring/{day}/quarantine.csv").decode()
    assert "\n12," in quarantine and "cannot parse 'deep' as a number" in quarantine


def test_credentials_never_reach_logs_or_stored_json(s3_run):
    completed, endpoint, _ = s3_run
    assert endpoint.secret_key not in completed.stdout + completed.stderr
    for uri in store_for(PREFIX).list(PREFIX):
        if uri.endswith(".json"):
            assert endpoint.secret_key not in json.dumps(read_json(uri)), uri
