"""The tabular preprocessing family end to end through Airflow: a housing spec that uses every option.

Rescaled and discretized numbers, a hashed category, a multi-valued column (derived
here from the housing data: ``amenities: "spacious|coastal"``) and a cross of
latitude and longitude bins, through ``airflow dags test`` of a DAG file exactly like
``dags/housing.py`` with that spec. The model must meet the housing RMSE bound, and
its SavedModel answers raw rows, unseen and missing values included.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import HOUSING_CSV, ROOT, airflow_dags_test

pytestmark = pytest.mark.slow
DATE = "2026-11-24"

FEATURES = {
    "longitude": {"kind": "numeric", "transform": "discretize", "bins": 20},
    "latitude": {"kind": "numeric", "transform": "discretize", "bins": 20},
    "housing_median_age": {"kind": "numeric", "transform": "discretize", "bins": 8, "encoding": "embedding",
                           "embedding_dim": 3},
    "total_rooms": {"kind": "numeric", "transform": "rescale"},
    "total_bedrooms": {"kind": "numeric", "transform": "rescale"},
    "population": {"kind": "numeric", "transform": "rescale"},
    "households": {"kind": "numeric", "transform": "rescale"},
    "median_income": {"kind": "numeric"},
    "ocean_proximity": {"kind": "categorical", "num_bins": 16},
    "amenities": {"kind": "categorical", "delimiter": "|", "encoding": "multi_hot"},
}
CROSSES = [{"features": ["latitude", "longitude"], "num_bins": 1000, "encoding": "embedding", "embedding_dim": 8}]


def amenities(frame: pd.DataFrame) -> pd.Series:
    """A multi-valued column made of what the district's numbers say, in no fixed order, with stray spaces."""
    tags = pd.DataFrame({
        "spacious": frame.total_rooms / frame.households > 6,
        "crowded": frame.population / frame.households > 3.5,
        "new": frame.housing_median_age < 15,
        "coastal": frame.ocean_proximity.isin(["NEAR OCEAN", "NEAR BAY"]),
    })
    return tags.apply(lambda row: " | ".join(name for name, on in row.items() if on), axis=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    frame = pd.read_csv(HOUSING_CSV)
    frame["amenities"] = amenities(frame)
    frame.to_csv(tmp / "housing_amenities.csv", index=False)

    spec = yaml.safe_load((ROOT / "include" / "housing.yaml").read_text())
    spec.update(name="housing_family", features=FEATURES, crosses=CROSSES)
    spec.pop("tuning")  # housing's search names housing's features; this run does not tune
    (tmp / "housing_family.yaml").write_text(yaml.safe_dump(spec))
    dags = tmp / "dags"
    dags.mkdir()
    dag = (ROOT / "dags" / "housing.py").read_text()
    dag = dag.replace('Path(__file__).parents[1] / "include" / "housing.yaml"', repr(str(tmp / "housing_family.yaml")))
    dag = dag.replace('dag_id="housing"', 'dag_id="housing_family"')
    assert "housing_family" in dag and str(tmp) in dag
    (dags / "housing_family.py").write_text(dag)

    dags_test, store = airflow_dags_test(tmp / "airflow", "housing_family", dags_folder=dags)
    completed = dags_test(DATE, conf={"source_uri": str(tmp / "housing_amenities.csv"), "epochs": 12})
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    return store


def test_it_meets_the_housing_bound(run):
    metrics = json.loads((run / "runs" / "housing_family" / f"{DATE}T000000" / "evaluate" / "metrics.json").read_text())
    assert metrics["blessed"] and metrics["metrics"]["rmse"] <= 60_000, metrics["metrics"]


def test_each_option_adapted_its_state(run):
    state = json.loads((run / "preprocessing" / "housing_family" / DATE / "state.json").read_text())
    features = state["features"]
    assert len(features["latitude"]["boundaries"]) == 19 and len(features["housing_median_age"]["boundaries"]) <= 7
    assert features["total_rooms"]["options"]["transform"] == "rescale" and features["total_rooms"]["max"] > 30_000
    assert features["ocean_proximity"]["bins_used"] <= 5 and features["ocean_proximity"]["num_bins"] == 16
    assert set(features["amenities"]["vocabulary"]) == {"spacious", "crowded", "new", "coastal"}
    assert state["crosses"][0]["features"] == ["latitude", "longitude"]


PROBE = """
import json, sys
import numpy as np, tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures
rows = {
    "longitude": [-122.23, -122.23, -122.23, -200.0, float("nan")],
    "latitude": [37.88, 37.88, 37.88, 99.0, float("nan")],
    "housing_median_age": [41.0, 41.0, 41.0, 41.0, float("nan")],
    "total_rooms": [880.0, 880.0, 880.0, 880.0, float("nan")],
    "total_bedrooms": [129.0, 129.0, 129.0, 129.0, float("nan")],
    "population": [322.0, 322.0, 322.0, 322.0, float("nan")],
    "households": [126.0, 126.0, 126.0, 126.0, float("nan")],
    "median_income": [8.3252, 8.3252, 8.3252, 8.3252, float("nan")],
    "ocean_proximity": ["NEAR BAY", "ATLANTIS", "NEAR BAY", "NEAR BAY", ""],
    "amenities": ["coastal", "coastal", "never seen|coastal", "coastal", ""],
}
typed = {k: tf.constant(v, tf.string if isinstance(v[0], str) else tf.float32) for k, v in rows.items()}
texts = {k: tf.constant([" NA " if isinstance(x, float) and x != x else f" {x} " for x in v]) for k, v in rows.items()}
print(json.dumps({"typed": serve["serving_default"](**typed)["predictions"].numpy().tolist(),
                  "text": serve["serving_raw"](**texts)["predictions"].numpy().tolist()}))
"""


def test_the_saved_model_answers_raw_rows_with_unseen_and_missing_values(run):
    versions = sorted(int(v) for v in os.listdir(run / "serving" / "housing_family") if v.isdigit())
    completed = subprocess.run([sys.executable, "-c", PROBE, str(run / "serving" / "housing_family" / str(versions[-1]))],
                               capture_output=True, text=True, cwd=ROOT, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    answers = json.loads(completed.stdout.strip().splitlines()[-1])
    typed = np.array(answers["typed"])
    assert np.isfinite(typed).all() and (typed > 10_000).all() and (typed < 1_000_000).all(), typed
    assert typed[0] > 250_000  # a rich Bay Area district (its label is $452,600)
    assert answers["text"] == pytest.approx(answers["typed"], rel=1e-6)  # the same rows as padded CSV text
