"""Long values: the shard step's memory follows bytes, not the longest value.

Three inputs of the same row count, each sharded in a fresh process (peak memory is
that job's own, VmHWM), in turns:
- plain: the housing schema, synthetic, fixed seed (the anchor);
- long values: the same rows plus a column of long strings, every one different
  (1.5-2.5 KiB, 2 KiB on average), as text and image columns will have;
- one long cell: the plain rows with one 16 KiB ``ocean_proximity`` value.
Targets: peak memory at most 1.5x the plain job's with the long column, at most
1.2x with the one long cell. The shards of each are parsed back and compared with
the input values elsewhere (tests/test_shard.py); here only memory and rows/s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.data import housing_frame, housing_spec, write_validated
from benchmarks.harness import Target

ROOT = Path(__file__).resolve().parents[1]
LONG_BYTES = (1536, 2560)  # the long column's value lengths, uniform
CELL_BYTES = 16_384

_SHARD_JOB = """
import json, shutil, sys, time
from benchmarks.bench_long_values import spec_for
from tfjobs.shard import shard_dataset
validated, output, long_column = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
shutil.rmtree(output, ignore_errors=True)
started = time.perf_counter()
result = shard_dataset(spec_for(long_column), validated, output, processes=1)
seconds = time.perf_counter() - started
peak_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
print(json.dumps({"rows": sum(result.records.values()), "seconds": seconds, "peak_kib": peak_kib}))
"""


def spec_for(long_column: bool):
    extra = {"description": {"kind": "categorical"}} if long_column else None
    return housing_spec({"train": 8, "eval": 2, "test": 2}, extra)


def long_strings(rows: int, seed: int = 1) -> np.ndarray:
    """``rows`` different strings of lowercase letters, ``LONG_BYTES`` long."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*LONG_BYTES, rows)
    letters = rng.integers(97, 123, int(lengths.sum()), dtype=np.uint8).tobytes().decode()
    ends = np.cumsum(lengths).tolist()
    return np.array([letters[end - n : end] for end, n in zip(ends, lengths.tolist())], dtype=object)


def _shard_job(validated: str, output: Path, long_column: bool) -> dict:
    completed = subprocess.run([sys.executable, "-c", _SHARD_JOB, validated, str(output), str(int(long_column))],
                               capture_output=True, text=True, check=True, cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> list[Target]:
    rows = 100_000 if quick else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = housing_frame(rows).fillna({"ocean_proximity": ""})
        cell = plain.copy()
        cell.loc[rows // 2, "ocean_proximity"] = "x" * CELL_BYTES
        inputs = {
            "plain": (write_validated(plain, spec_for(False), tmp / "plain"), False),
            "long": (write_validated(plain.assign(description=long_strings(rows)), spec_for(True), tmp / "long"),
                     True),
            "cell": (write_validated(cell, spec_for(False), tmp / "cell"), False),
        }
        del plain, cell
        results: dict[str, list[dict]] = {name: [] for name in inputs}
        for _ in range(2):  # in turns: this machine's speed drifts
            for name, (validated, long_column) in inputs.items():
                results[name].append(_shard_job(validated, tmp / f"shards-{name}", long_column))
    peak = {name: min(r["peak_kib"] for r in runs) / 1024 for name, runs in results.items()}
    speed = {name: max(r["rows"] / r["seconds"] for r in runs) for name, runs in results.items()}
    return [
        Target("shard peak memory, a column of long distinct strings", peak["long"], peak["plain"], "MiB",
               "the plain housing rows", 1.5, lower_is_better=True,
               note=f"{rows:,} rows, {LONG_BYTES[0]}-{LONG_BYTES[1]} B each; {speed['long']:,.0f} rows/s "
                    f"vs {speed['plain']:,.0f} rows/s plain"),
        Target(f"shard peak memory, one {CELL_BYTES // 1024} KiB cell", peak["cell"], peak["plain"], "MiB",
               "the plain housing rows", 1.2, lower_is_better=True,
               note=f"{rows:,} rows; {speed['cell']:,.0f} rows/s vs {speed['plain']:,.0f} rows/s plain"),
    ]
