"""The penguins DAG end to end through Airflow (`airflow dags test` on SQLite), as `make demo` runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import airflow_dags_test

pytestmark = pytest.mark.slow
DATE = "2026-11-25"
VERSION = 1795564800  # 2026-11-25T00:00:00Z in Unix seconds


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    return airflow_dags_test(tmp_path_factory.mktemp("airflow"), "penguins")


@pytest.fixture(scope="module")
def first_run(airflow):
    dags_test, _ = airflow
    return dags_test(DATE)


def snapshot(directory: Path) -> dict[str, int]:
    # The run report describes each run (the second one's drift check has a production model to compare with).
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != "report.html"}


def test_dag_run_publishes_an_accurate_serving_model(airflow, first_run):
    dags_test, store = airflow
    completed = first_run
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    log = completed.stdout + completed.stderr
    assert "epoch 1/" in log  # per-epoch progress in the task log

    model_dir = store / "serving" / "penguins" / str(VERSION)
    assert (model_dir / "saved_model.pb").exists()
    metrics = json.loads((store / "runs/penguins/2026-11-25T000000/evaluate/metrics.json").read_text())
    assert metrics["blessed"] and metrics["metrics"]["accuracy"] >= 0.95
    assert (store / "runs/penguins/2026-11-25T000000/train/training_curve.png").stat().st_size > 1000

    probe = (
        "import sys, numpy as np, tensorflow as tf\n"
        "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "p = f(bill_length_mm=tf.constant([np.nan]), bill_depth_mm=tf.constant([17.0]),"
        " flipper_length_mm=tf.constant([200.0]), body_mass_g=tf.constant([4000.0]),"
        " island=tf.constant(['Atlantis']), sex=tf.constant(['']), year=tf.constant([2008], tf.int64))"
        "['probabilities'].numpy()\n"
        "assert p.shape == (1, 3) and np.isfinite(p).all() and abs(p.sum() - 1) < 1e-5, p\n"
    )
    subprocess.run([sys.executable, "-c", probe, str(model_dir)], check=True, capture_output=True)


def test_second_run_of_the_same_date_rewrites_nothing(airflow, first_run):
    dags_test, store = airflow
    data_dirs = [store / stage for stage in ("raw", "validated", "shards", "preprocessing", "runs", "serving")]
    before = {str(d): snapshot(d) for d in data_dirs}
    completed = dags_test(DATE)
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert {str(d): snapshot(d) for d in data_dirs} == before
    assert sorted(os.listdir(store / "serving" / "penguins")) == [str(VERSION), "models.config", "production.json"]


def test_csv_without_label_fails_the_validate_task_naming_the_column(airflow, tmp_path):
    import palmerpenguins

    dags_test, store = airflow
    csv = tmp_path / "no_label.csv"
    palmerpenguins.load_penguins().drop(columns=["species"]).to_csv(csv, index=False)
    completed = dags_test("2026-11-20", conf={"source_uri": str(csv)})
    log = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "'species' (the label) missing" in log
    assert not (store / "shards" / "penguins" / "2026-11-20").exists()
    assert not (store / "serving" / "penguins" / str(VERSION - 5 * 86400)).exists()


def test_the_scoring_dag_scores_a_landing_file_with_the_production_model(airflow, first_run):
    """penguins_scoring reads <store>/landing/penguins/<date>.csv (no label), and writes one prediction per valid
    row, in order, with the production version; the rows that fail validation are in the quarantine."""
    import palmerpenguins
    import pandas as pd

    _, store = airflow
    scoring_test, _ = airflow_dags_test(store.parent, "penguins_scoring")
    day = "2026-11-26"
    delivery = palmerpenguins.load_penguins().sample(150, random_state=7).drop(columns=["species"]).astype(str)
    delivery.iloc[[3, 90], delivery.columns.get_loc("year")] = "2008.5"  # not an integer: quarantined
    (store / "landing" / "penguins").mkdir(parents=True)
    delivery.to_csv(store / "landing" / "penguins" / f"{day}.csv", index=False)
    completed = scoring_test(day)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    predictions = pd.read_parquet(store / "predictions" / "penguins" / day / "predictions.parquet")
    quarantine = pd.read_csv(store / "validated" / "penguins_scoring" / day / "quarantine.csv")
    assert len(predictions) == 148 and predictions["_line"].tolist() == [n for n in range(2, 152) if n not in (5, 92)]
    assert quarantine["_line"].tolist() == [5, 92] and quarantine["_reason"].str.contains("not an integer").all()
    assert (predictions["model_version"] == VERSION).all()
    assert set(predictions["prediction"]) <= {"Adelie", "Chinstrap", "Gentoo"}
    assert not (store / "raw" / "penguins" / day).exists()  # the training data's partitions are untouched
    report = (store / "runs" / "penguins_scoring" / f"{day}T000000" / "report.html").read_text()
    assert "148 rows scored" in report
