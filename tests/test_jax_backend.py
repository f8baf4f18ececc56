"""The training model is backend-agnostic Keras: it trains under KERAS_BACKEND=jax, and the
TensorFlow export step serves what JAX trained (a .keras file does not care which backend wrote it)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tfjobs.evaluate import evaluate_model
from tfjobs.export import ExportArgs, export_model
from tfjobs.train import STACKED_STEPS

TRAIN_UNDER_JAX = """
import json, sys
import keras
assert keras.backend.backend() == "jax"
from tfjobs.spec import load_spec
from tfjobs.train import TrainArgs, train_model
spec = load_spec(sys.argv[1])
result = train_model(TrainArgs(spec, sys.argv[2], sys.argv[3], sys.argv[4], {"epochs": 25}))
summary = json.load(open(result.summary_uri))
print(json.dumps({"backend": summary["backend"], "input": summary["input"], "steps_per_call": summary["steps_per_call"],
                  "metrics": result.metrics}))
"""


@pytest.fixture(scope="module")
def jax_training(penguins_pipeline, tmp_path_factory):
    pytest.importorskip("jax")
    output = str(tmp_path_factory.mktemp("jax") / "train")
    run = penguins_pipeline
    completed = subprocess.run(
        [sys.executable, "-c", TRAIN_UNDER_JAX, str(ROOT / "include" / "penguins.yaml"), run.shard.manifest_uri,
         run.adapt.state_uri, output],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return output, json.loads(completed.stdout.strip().splitlines()[-1])


def test_training_runs_under_jax(jax_training):
    _, result = jax_training
    assert result["backend"] == "jax"
    assert result["input"] == "memory"  # tfjobs.modeling.in_memory.ShuffledBatches, not a tf.data batch per step
    assert result["steps_per_call"] == STACKED_STEPS  # stacks of batches, one lax.scan each
    assert result["metrics"]["val_accuracy"] >= 0.9


def test_a_jax_trained_model_is_evaluated_and_exported_by_tensorflow(jax_training, penguins_pipeline, tmp_path):
    output, _ = jax_training
    run = penguins_pipeline
    model_uri = f"{output}/training_model.keras"
    evaluation = evaluate_model(run.spec, model_uri, run.adapt.state_uri, run.shard.manifest_uri, str(tmp_path / "eval"))
    assert evaluation.blessed and evaluation.metrics["accuracy"] >= 0.95
    exported = export_model(ExportArgs(run.spec, model_uri, run.adapt.state_uri, run.shard.manifest_uri,
                                       evaluation.metrics_uri, str(tmp_path / "serving"), 42))
    assert exported.version == 42 and exported.max_skew < 1e-4
