"""GPU training: Keras fit() on the housing model (JAX backend) vs a hand-written JAX step, one run.

Runs ``benchmarks/gpu_training.py`` in a fresh process with KERAS_BACKEND=jax; it must not
import TensorFlow. Target: fit() >= 0.5x the hand-written step's examples/s. On a machine
without a GPU it runs on JAX's CPU device and says so (the target is meant for a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Target

ROOT = Path(__file__).resolve().parents[1]


def run(quick: bool = False) -> list[Target]:
    try:
        import jax  # noqa: F401
    except ImportError:
        print("skipped: JAX is not installed")
        return []
    rows = 200_000 if quick else 2_000_000
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_training", "--rows", str(rows), "--epochs", "4"],
        capture_output=True, text=True, cwd=ROOT, check=True,
        env={**os.environ, "KERAS_BACKEND": "jax",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    if result["tensorflow_imported"]:
        raise AssertionError("The GPU benchmark imported TensorFlow")
    return [Target("Keras fit (JAX) vs hand-written JAX step", result["keras_fit"], result["hand_written_jax"],
                   "examples/s", "hand-written JAX", 0.5,
                   note=f"device {result['device']}, {result['rows']:,} rows, batch {result['batch']}, "
                        f"fit() on {result['keras_fit_config']}; a whole epoch in one lax.scan: "
                        f"{result['hand_written_jax_scan_epoch']:,.4g} examples/s")]
