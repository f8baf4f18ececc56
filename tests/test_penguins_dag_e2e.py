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


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_dag_run_publishes_an_accurate_serving_model(airflow):
    dags_test, store = airflow
    completed = dags_test(DATE)
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


def test_second_run_of_the_same_date_rewrites_nothing(airflow):
    dags_test, store = airflow
    data_dirs = [store / stage for stage in ("raw", "validated", "shards", "preprocessing", "runs", "serving")]
    before = {str(d): snapshot(d) for d in data_dirs}
    completed = dags_test(DATE)
    assert completed.returncode == 0, completed.stdout[-3000:]
    assert {str(d): snapshot(d) for d in data_dirs} == before
    assert sorted(os.listdir(store / "serving" / "penguins")) == [str(VERSION)]


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
