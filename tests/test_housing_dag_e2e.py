"""The housing DAG end to end through Airflow (`airflow dags test`), once per model kind and training loop.

Every run is for the same logical date, so the data steps run once (the first run
reads the day's delivery from a landing prefix; later runs fetch the same bytes
and rewrite nothing) and each run trains, evaluates and exports its own model.
"""

import datetime
import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import HOUSING_CSV, ROOT, airflow_dags_test
from tfjobs import choices
from tfjobs.deadlines import utc_now, utc_text

pytestmark = pytest.mark.slow
DATE = "2026-11-24"
EPOCHS = 12  # enough for every kind to clear the $60,000 bar, few enough for 2 loaded cores
RUNS = [(kind, "fit") for kind in sorted(choices.MODEL_KINDS)] + [("wide_deep", "custom")]
ARTIFACTS = ROOT / "tests" / "artifacts"  # git-ignored


@pytest.fixture(scope="module")
def landing(tmp_path_factory):
    """A landing prefix with one delivery: the shared CSV as the file of DATE (a link, not a copy)."""
    prefix = tmp_path_factory.mktemp("landing")
    os.symlink(HOUSING_CSV, prefix / f"{DATE}.csv")
    return prefix


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    return airflow_dags_test(tmp_path_factory.mktemp("airflow"), "housing")


@pytest.fixture(scope="module")
def runs(airflow, landing):
    """Each (kind, loop) run of DATE: its return code, log tail, test metrics and serving version."""
    dags_test, store = airflow
    results = {}
    for i, (kind, loop) in enumerate(RUNS):
        source = {"source_uri": f"{landing}/{{partition}}.csv"} if i == 0 else {"source_uri": str(HOUSING_CSV)}
        # Each kind is published, whatever the one before it scored: the kinds are compared here, not promoted.
        completed = dags_test(DATE, conf={"model": kind, "loop": loop, "epochs": EPOCHS, "force_promotion": True,
                                          **source})
        log = completed.stdout + completed.stderr
        result = {"returncode": completed.returncode, "log": log[-6000:], "progress": "epoch 1/" in log,
                  "two_optimizers": "Custom loop: SGD on" in log}
        if completed.returncode == 0:
            run = store / "runs" / "housing" / f"{DATE}T000000"
            result["evaluation"] = json.loads((run / "evaluate" / "metrics.json").read_text())
            result["training"] = json.loads((run / "train" / "training.json").read_text())
            versions = sorted(int(v) for v in os.listdir(store / "serving" / "housing") if v.isdigit())
            result["version_dir"] = str(store / "serving" / "housing" / str(versions[-1]))
        results[(kind, loop)] = result
    record = {f"{k}/{l}": {"rmse": r.get("evaluation", {}).get("metrics", {}).get("rmse"),
                           "epochs_run": r.get("training", {}).get("epochs_run")} for (k, l), r in results.items()}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "housing_dag_runs.json").write_text(json.dumps(record, indent=2) + "\n")  # for the issue notes
    return store, results


def test_every_kind_and_loop_runs_end_to_end_and_clears_the_rmse_bar(runs):
    results = runs[1]
    for (kind, loop), result in results.items():
        assert result["returncode"] == 0, f"{kind}/{loop}:\n{result['log']}"
        assert result["progress"], f"{kind}/{loop}: no per-epoch progress line in the task log"
        assert (result["training"]["model_kind"], result["training"]["loop"]) == (kind, loop)
        evaluation = result["evaluation"]
        assert evaluation["blessed"] and evaluation["metrics"]["rmse"] <= 60_000, (kind, loop, evaluation["metrics"])
    assert len({r["version_dir"] for r in results.values()}) == len(RUNS)  # each run published its own version


def test_custom_loop_with_two_optimizers_is_within_ten_percent_of_fit(runs):
    results = runs[1]
    fit = results[("wide_deep", "fit")]["evaluation"]["metrics"]["rmse"]
    custom = results[("wide_deep", "custom")]
    assert custom["training"]["settings"]["epochs"] == results[("wide_deep", "fit")]["training"]["settings"]["epochs"]
    assert custom["evaluation"]["metrics"]["rmse"] <= 1.10 * fit
    assert custom["two_optimizers"] and not results[("wide_deep", "fit")]["two_optimizers"]


def test_the_day_was_read_from_the_landing_prefix(runs, landing):
    store, _ = runs
    manifest = json.loads((store / "raw" / "housing" / DATE / "manifest.json").read_text())
    assert manifest["source"] == f"{landing}/{DATE}.csv" and manifest["rows"] == 20_640
    state = json.loads((store / "preprocessing" / "housing" / DATE / "state.json").read_text())
    # ISLAND's 5 rows are below min_frequency: they train the out-of-vocabulary embedding.
    assert "ISLAND" not in state["features"]["ocean_proximity"]["vocabulary"]
    assert state["features"]["ocean_proximity"]["out_of_vocabulary"]["occurrences"] == 5
    assert state["features"]["total_bedrooms"]["missing"] > 0


PROBE = """
import json, sys
import numpy as np, tensorflow as tf
import tfjobs.features.preprocessing  # registers Shardline's Keras objects: the .keras file needs them
import keras

state = json.loads(open(sys.argv[1]).read())
bedrooms_mean = np.float32(state["features"]["total_bedrooms"]["mean"])
rows = {
    "longitude": [-122.23, -122.23, -122.23, -122.23, -118.32, -121.0],
    "latitude": [37.88, 37.88, 37.88, 37.88, 33.35, 39.0],
    "housing_median_age": [41.0, 41.0, 41.0, 41.0, 27.0, 20.0],
    "total_rooms": [880.0, 880.0, 880.0, 880.0, 1675.0, 3000.0],
    "total_bedrooms": [129.0, np.nan, bedrooms_mean, 129.0, 521.0, np.nan],
    "population": [322.0, 322.0, 322.0, 322.0, 744.0, 1500.0],
    "households": [126.0, 126.0, 126.0, 126.0, 331.0, 500.0],
    "median_income": [8.3252, 8.3252, 8.3252, 8.3252, 2.1579, 3.0],
    "ocean_proximity": ["NEAR BAY", "NEAR BAY", "NEAR BAY", "ATLANTIS", "ISLAND", ""],
}
out = {}
for version_dir in sys.argv[2:]:
    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    inputs = {k: tf.constant(v, tf.string if k == "ocean_proximity" else tf.float32) for k, v in rows.items()}
    served = serve(**inputs)["predictions"].numpy()
    model = keras.saving.load_model(version_dir + "/model.keras")
    reloaded = np.asarray(model(inputs, training=False)).reshape(-1)
    island_like = dict(inputs, ocean_proximity=tf.constant(["ISLAND"] * 6))
    unseen_like = dict(inputs, ocean_proximity=tf.constant(["ATLANTIS"] * 6))
    out[version_dir] = {
        "served": served.tolist(), "reloaded": reloaded.tolist(),
        "island": serve(**island_like)["predictions"].numpy().tolist(),
        "unseen": serve(**unseen_like)["predictions"].numpy().tolist(),
    }
print(json.dumps(out))
"""


def test_every_kind_serves_raw_rows_in_dollars_and_reloads_from_keras_in_a_fresh_process(runs):
    store, results = runs
    version_dirs = [r["version_dir"] for r in results.values()]
    state = store / "preprocessing" / "housing" / DATE / "state.json"
    completed = subprocess.run([sys.executable, "-c", PROBE, str(state), *version_dirs],
                               capture_output=True, text=True, cwd=ROOT, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    probes = json.loads(completed.stdout.strip().splitlines()[-1])
    for version_dir in version_dirs:
        probe = probes[version_dir]
        served, reloaded = probe["served"], probe["reloaded"]
        assert all(math.isfinite(p) and 10_000 < p < 1_000_000 for p in served), (version_dir, served)  # dollars
        assert served[0] > 250_000  # a rich Bay Area district (its label is $452,600)
        assert reloaded == pytest.approx(served, rel=1e-6, abs=0.01)  # .keras and SavedModel agree
        assert served[1] == pytest.approx(served[2], abs=0.01)  # missing total_bedrooms = the training mean
        assert probe["island"] == pytest.approx(probe["unseen"], abs=0.01)  # rare and unseen: one trained index


def test_a_day_without_delivery_fails_the_fetch_naming_the_partition(airflow, landing):
    """The fetch looks for the day's file every second, giving its worker back in between, until the deadline."""
    dags_test, store = airflow
    # `airflow dags test` takes about 10 s to the first poke on the 2-core VM, over 20 s when it is loaded:
    # 40 s leaves time for several pokes either way.
    deadline = (utc_now() + datetime.timedelta(seconds=40)).replace(microsecond=0)
    started = time.monotonic()
    completed = dags_test("2026-11-25", conf={"source_uri": f"{landing}/{{partition}}.csv", "epochs": 1,
                                              "delivery_deadline": utc_text(deadline), "delivery_poke_interval": "1s"})
    log = completed.stdout + completed.stderr
    assert completed.returncode != 0
    pokes = log.count("No delivery for 2026-11-25 yet")
    assert pokes >= 2 and log.count("marking task as UP_FOR_RESCHEDULE") == pokes, log[-3000:]
    assert f"No delivery for 2026-11-25 by {utc_text(deadline)}: expected {landing}/2026-11-25.csv" in log
    assert utc_now() >= deadline
    assert not (store / "raw" / "housing" / "2026-11-25").exists()
    record = {"pokes": pokes, "seconds": round(time.monotonic() - started, 1)}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "housing_dag_late_delivery.json").write_text(json.dumps(record) + "\n")  # for the issue notes
