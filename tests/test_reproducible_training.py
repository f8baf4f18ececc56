"""``training.deterministic``: two runs of the training job with the same seed give the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_two_deterministic_training_runs_give_identical_weights(tmp_path):
    """Each run is its own process, as two Airflow tries would be. Sixteen training shards make the
    order in which the readers hand over records matter: without the option, two runs differ."""
    import keras

    import tfjobs.modeling.models  # noqa: F401  (registers the layers the saved model uses)
    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.fetch import fetch_dataset
    from tfjobs.shard import shard_dataset
    from tfjobs.spec import load_spec
    from tfjobs.storage.layout import Layout
    from tfjobs.validate import validate_dataset

    raw = yaml.safe_load((ROOT / "include" / "penguins.yaml").read_text())
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**raw, "shards": {"train": 16, "eval": 1, "test": 1}}))
    spec = load_spec(tmp_path / "spec.yaml")
    layout = Layout(str(tmp_path / "store"), spec.name, "2026-11-25", run="r1")
    fetch_dataset(spec, layout.raw)
    validate_dataset(spec, layout.raw, layout.validated)
    manifest = shard_dataset(spec, layout.validated, layout.shards).manifest_uri
    state = adapt_preprocessing(spec, manifest, layout.preprocessing).state_uri

    command = [sys.executable, "-m", "tfjobs.train", "--spec", str(tmp_path / "spec.yaml"), "--shards", manifest,
               "--state", state, "--set", "epochs=1", "--set", "deterministic=true", "--output"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "tensorflow"}
    runs = [subprocess.Popen([*command, str(tmp_path / name)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    for process in runs:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]

    weights = [keras.saving.load_model(tmp_path / name / "training_model.keras").get_weights() for name in ("a", "b")]
    assert len(weights[0]) > 2 and all(np.array_equal(a, b) for a, b in zip(*weights))
    histories = [json.loads((tmp_path / name / "history.json").read_text()) for name in ("a", "b")]
    assert histories[0] == histories[1] and len(histories[0]["loss"]) == 1
    assert json.loads((tmp_path / "a" / "training.json").read_text())["settings"]["deterministic"] is True
