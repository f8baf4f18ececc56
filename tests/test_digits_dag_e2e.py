"""The digits DAG end to end through Airflow (`airflow dags test`): an image folder to a CNN served from encoded bytes.

The test writes scikit-learn's 1,797 digits as PNG files, one folder per digit, plus a
text file and a truncated PNG among them; one run of the DAG over that folder is shared
by every assertion. A fresh process then loads the SavedModel and classifies encoded
files: the test split's PNGs, JPEGs of the same digits, the digits at another size and
in colour, through ``serving_default`` as bytes and ``serving_raw`` as base64 text.
"""

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, airflow_dags_test
from tfjobs.storage.image_folder import sklearn_digits_files, write_image_folder

pytestmark = pytest.mark.slow
DATE = "2026-11-25"
VERSION = 1795564800  # 2026-11-25T00:00:00Z in Unix seconds
ARTIFACTS = ROOT / "tests" / "artifacts"  # git-ignored


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    files = sklearn_digits_files()
    files["4/digit_0004.png"] = truncated = files["4/digit_0004.png"][:-16]
    files["8/scan_notes.txt"] = b"scanned on a Tuesday"  # not an image
    write_image_folder(str(tmp / "landing"), files)
    dags_test, store = airflow_dags_test(tmp / "airflow", "digits")
    started = time.monotonic()
    completed = dags_test(DATE, conf={"source_uri": str(tmp / "landing")})
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-6000:]
    evaluation = read(store, f"runs/digits/{DATE}T000000/evaluate/metrics.json")
    training = read(store, f"runs/digits/{DATE}T000000/train/training.json")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "digits_dag_run.json").write_text(json.dumps({  # for the issue notes
        "seconds": round(time.monotonic() - started, 1),
        "test_metrics": {k: v for k, v in evaluation["metrics"].items() if isinstance(v, float)},
        "epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"]}, indent=2) + "\n")
    return store, completed.stdout + completed.stderr, len(truncated)


def read(store, path):
    return json.loads((store / path).read_text())


def test_the_cnn_clears_the_accuracy_bar_and_is_published(run):
    store, log, _ = run
    evaluation = read(store, f"runs/digits/{DATE}T000000/evaluate/metrics.json")
    assert evaluation["blessed"] and evaluation["metrics"]["accuracy"] >= 0.95, evaluation["metrics"]
    training = read(store, f"runs/digits/{DATE}T000000/train/training.json")
    assert training["model_kind"] == "mlp" and "epoch 1/" in log
    metadata = read(store, f"serving/digits/{VERSION}/shardline.json")
    assert metadata["max_skew"] <= 1e-5  # the export's skew check passed: bytes and base64 text, edge images too
    assert metadata["signature"]["inputs"]["image"]["dtype"] == "bytes"
    assert '{"b64": ' in metadata["signature"]["inputs"]["image"]["send"]


def test_the_bad_files_were_quarantined_with_their_reasons(run):
    store, _, truncated_size = run
    report = read(store, f"validated/digits/{DATE}/report.json")
    assert (report["rows_in"], report["rows_valid"], report["rows_quarantined"]) == (1798, 1796, 2)
    assert sorted(report["reasons"]) == [
        f"image: cannot be decoded as an image (Invalid PNG data, size {truncated_size})",
        "image: cannot be decoded as an image (Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP "
        "required.)",
    ]
    quarantine = (store / "validated" / "digits" / DATE / "quarantine.csv").read_text()
    assert "4/digit_0004.png" in quarantine and "8/scan_notes.txt" in quarantine
    raw = read(store, f"raw/digits/{DATE}/manifest.json")
    assert (raw["format"], raw["rows"]) == ("parquet", 1798)
    state = read(store, f"preprocessing/digits/{DATE}/state.json")["features"]["image"]
    assert state["sizes"] == {"8x8": state["count"]} and state["formats"] == {"PNG": state["count"]}


PROBE = """
import base64, json, sys
import numpy as np, tensorflow as tf

serve = tf.saved_model.load(sys.argv[1]).signatures
manifest = json.load(open(sys.argv[2]))
paths = [sys.argv[2].rsplit("/", 1)[0] + "/" + shard["file"] for shard in manifest["splits"]["test"]["shards"]]
features = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.string)}
records = [tf.io.parse_single_example(r, features) for r in tf.data.TFRecordDataset(paths, compression_type="GZIP")]
pngs = [r["image"].numpy() for r in records]
labels = [r["label"].numpy().decode() for r in records]

def classify(files):
    return [c.decode() for c in serve["serving_default"](image=tf.constant(files))["classes"].numpy()]

pixels = [tf.io.decode_png(f).numpy() for f in pngs]
variants = {
    "png": pngs,
    "jpeg": [tf.io.encode_jpeg(p, quality=95).numpy() for p in pixels],
    "png_32x32": [tf.io.encode_png(np.kron(p, np.ones((4, 4, 1), np.uint8))).numpy() for p in pixels],
    "png_rgb": [tf.io.encode_png(np.repeat(p, 3, axis=-1)).numpy() for p in pixels],
}
out = {name: classify(files) for name, files in variants.items()}
texts = tf.constant([" " + base64.b64encode(f).decode() for f in pngs])
out["raw_text"] = [c.decode() for c in serve["serving_raw"](image=texts)["classes"].numpy()]
out["labels"] = labels
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(run):
    store, _, _ = run
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, str(store / "serving" / "digits" / str(VERSION)),
         str(store / "shards" / "digits" / DATE / "manifest.json")],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def accuracy(predicted, labels):
    return sum(p == t for p, t in zip(predicted, labels)) / len(labels)


def test_a_fresh_process_classifies_encoded_files_of_any_size_format_and_colour(probe):
    labels = probe["labels"]
    assert len(labels) > 200 and accuracy(probe["png"], labels) >= 0.95
    for variant in ("jpeg", "png_32x32", "png_rgb"):
        assert accuracy(probe[variant], labels) >= 0.93, variant
        assert accuracy(probe[variant], probe["png"]) >= 0.95, variant  # the same digit, the same answer
    assert probe["png_32x32"] == probe["png"]  # a 4x blow-up resizes back to the very pixels
    assert probe["raw_text"] == probe["png"]  # serving_raw: the same files as base64 text


def test_tfjobs_predict_takes_tf_serving_b64_instances_and_the_report_shows_the_sizes(run):
    store, _, _ = run
    completed = subprocess.run(
        [sys.executable, "-m", "tfjobs.predict", "--serving", str(store / "serving" / "digits"),
         "--instances", str(ROOT / "include" / "digits_request.json")],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert [p["classes"] for p in result["predictions"]] == ["3", "7"]
    completed = subprocess.run(
        [sys.executable, "-m", "tfjobs.report", "--spec", str(ROOT / "include" / "digits.yaml"), "--store", str(store)],
        capture_output=True, text=True, cwd=ROOT, check=True)
    assert "image: " in completed.stdout and "sizes 8x8" in completed.stdout and "PNG" in completed.stdout
