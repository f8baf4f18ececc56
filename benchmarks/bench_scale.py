"""Scale: the per-row cost of shard + adapt + one training epoch, small against large; the shard step's memory.

Each size runs in a fresh process (so that peak memory is that step's own): the
housing schema, synthetic, fixed seed. Targets: the per-row cost at the large size
is at most 1.2x the small size's, and the shard step's peak memory does not grow
with the row count (it streams record batches; at most 1.15x from 1/4 of the rows).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.data import housing_frame, housing_spec, write_validated
from benchmarks.harness import Target

ROOT = Path(__file__).resolve().parents[1]

_ONE_SIZE = """
import json, sys, tempfile, time
from pathlib import Path
from benchmarks.data import housing_spec
validated, steps = sys.argv[1], sys.argv[2]
spec = housing_spec({"train": 16, "eval": 2, "test": 2})
tmp = Path(tempfile.mkdtemp())
out = {}
from tfjobs.shard import shard_dataset
started = time.perf_counter()
manifest = shard_dataset(spec, validated, str(tmp / "shards"), processes=1).manifest_uri
out["shard_s"] = time.perf_counter() - started
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec.
out["shard_peak_kib"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
if steps == "all":
    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.train import TrainArgs, train_model
    started = time.perf_counter()
    state = adapt_preprocessing(spec, manifest, str(tmp / "prep")).state_uri
    out["adapt_s"] = time.perf_counter() - started
    started = time.perf_counter()
    train_model(TrainArgs(spec, manifest, state, str(tmp / "train"), {"epochs": 1, "batch_size": 1024}))
    out["epoch_s"] = time.perf_counter() - started
print(json.dumps(out))
"""


def _measure(validated: str, steps: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", _ONE_SIZE, validated, steps], capture_output=True, text=True,
                               cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                          "TF_CPP_MIN_LOG_LEVEL": "2"})
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[Target]:
    small, large = (50_000, 800_000) if quick else (100_000, 4_000_000)
    costs = {}
    with tempfile.TemporaryDirectory() as tmp:
        validated = {}
        for rows in (small, large // 4, large):
            validated[rows] = write_validated(housing_frame(rows), housing_spec(), Path(tmp) / str(rows))
        for rows in (small, large):
            result = _measure(validated[rows], "all")
            costs[rows] = (result["shard_s"] + result["adapt_s"] + result["epoch_s"]) / rows
        quarter = _measure(validated[large // 4], "shard")
        whole = _measure(validated[large], "shard")
    return [
        Target(f"per-row cost of shard+adapt+1 epoch at {large:,} rows", costs[large] * 1e6, costs[small] * 1e6,
               "us/row", f"at {small:,} rows", 1.2, lower_is_better=True),
        Target(f"shard step peak memory at {large:,} rows", whole["shard_peak_kib"] / 1024,
               quarter["shard_peak_kib"] / 1024, "MiB", f"at {large // 4:,} rows", 1.15, lower_is_better=True,
               note="process RSS incl. Python, NumPy, pandas and pyarrow"),
    ]
