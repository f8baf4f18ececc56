"""Sharding: encode + write tf.train.Example TFRecords, against the usual ways, in one run.

Anchors measured here, on the same rows of the housing schema:
- the tutorial loop: one ``tf.train.Example`` built per row, ``TFRecordWriter.write``;
- one template Example mutated in place per row;
- ``tf.io.TFRecordWriter`` writing records that are already serialized (its ceiling).
Shardline's path (``encode_rows`` + ``frame_in_chunks`` + ``TFRecordFileWriter``) is measured with GZIP
off and on, and the whole shard job with one and two processes, on 4M rows (the
top of the issue's 1-4M scale; a 1M-row job takes about 1.5 s here, and its 2-process
speed-up was lower and noisier). Every record
written by the fast path is parsed back with ``tf.io.parse_example`` and compared.
The tfx-bsl figure (``RecordBatchToExamples``) is the published one: tfx-bsl pins
Apache Beam, protobuf and pyarrow versions that do not install beside Airflow 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.data import housing_frame, housing_spec, write_validated
from benchmarks.harness import Target, best_of

ROOT = Path(__file__).resolve().parents[1]

TFX_BSL_ROWS_PER_S = 130_000  # the top of the published 100,000-130,000 range


# The helpers of TensorFlow's "TFRecord and tf.train.Example" tutorial, as written there.
def _bytes_feature(value):
    """Returns a bytes_list from a string / byte."""
    import tensorflow as tf

    if isinstance(value, type(tf.constant(0))):
        value = value.numpy()  # BytesList won't unpack a string from an EagerTensor.
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _float_feature(value):
    """Returns a float_list from a float / double."""
    import tensorflow as tf

    return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))


def _tutorial_loop(values, columns, path, rows):
    """As the tutorial does: ``serialize_example`` for row i of the feature arrays, then ``writer.write``."""
    import tensorflow as tf

    def serialize_example(i):
        feature = {}
        for column in columns:
            value = values[column.name][i]
            if column.dtype == "float32":
                feature[column.name] = _float_feature(value)
            else:
                feature[column.name] = _bytes_feature(value.encode())
        example_proto = tf.train.Example(features=tf.train.Features(feature=feature))
        return example_proto.SerializeToString()

    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for i in range(rows):
            writer.write(serialize_example(i))


def _template_loop(columns, values, path, rows):
    import tensorflow as tf

    example = tf.train.Example()
    slots = {}
    for column in columns:
        feature = example.features.feature[column.name]
        slots[column.name] = feature.float_list.value if column.dtype == "float32" else feature.bytes_list.value
        slots[column.name].append(0.0 if column.dtype == "float32" else b"")
    lists = [(slots[c.name], values[c.name].tolist() if c.dtype == "float32" else [v.encode() for v in values[c.name]])
             for c in columns]
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for i in range(rows):
            for slot, column_values in lists:
                slot[0] = column_values[i]
            writer.write(example.SerializeToString())


def _fast_path(columns, values, path, compression):
    """What the shard job does with each batch: encode, frame (in chunks of bounded bytes), compress, write."""
    from tfjobs.storage.examples import encode_rows
    from tfjobs.storage.tfrecord import TFRecordFileWriter, frame_in_chunks

    rows = len(values[columns[0].name])
    with TFRecordFileWriter(path, compression) as writer:
        for start in range(0, rows, 65_536):
            chunk = {name: column[start : start + 65_536] for name, column in values.items()}
            framed = frame_in_chunks(encode_rows(columns, chunk))
            for first, stop, data in framed.runs(np.zeros(len(framed.chunk))):
                writer.write_framed(data, stop - first)


def _check_round_trip(columns, values, path, compression):
    import tensorflow as tf

    from tfjobs.storage.examples import parse_features

    parsed = {name: [] for name in values}
    dataset = tf.data.TFRecordDataset(path, compression_type=compression).batch(65_536)
    for batch in dataset.map(lambda records: tf.io.parse_example(records, parse_features(columns))):
        for name in parsed:
            parsed[name].append(batch[name].numpy())
    for column in columns:
        got = np.concatenate(parsed[column.name])
        expected = values[column.name]
        if column.dtype == "string":
            got = np.array([v.decode() for v in got], dtype=object)
        if not np.array_equal(got, expected, equal_nan=column.dtype == "float32"):
            raise AssertionError(f"{column.name}: records written by the fast path do not parse back to the input")


_SHARD_JOB = """
import json, shutil, sys, time
from benchmarks.data import housing_spec
from tfjobs.shard import shard_dataset
validated, output, processes = sys.argv[1], sys.argv[2], int(sys.argv[3])
spec = housing_spec({"train": 8, "eval": 2, "test": 2})
shutil.rmtree(output, ignore_errors=True)  # an up-to-date output would be skipped
started = time.perf_counter()
result = shard_dataset(spec, validated, output, processes=processes)
best = time.perf_counter() - started
print(json.dumps({"rows": sum(result.records.values()), "seconds": best}))
"""


def _hash_loop() -> None:
    """A CPU-bound loop that stays in cache: SHA-256 of 64 KiB, 20,000 times."""
    import hashlib

    data = bytes(65_536)
    for _ in range(20_000):
        hashlib.sha256(data).digest()


def _two_process_ceiling(work) -> float:
    """How much two processes get done, against one, on this machine: ``work`` alone, then two at once.

    A shared VM's two vCPUs need not be two whole cores: this says what two processes can get here.
    """
    import multiprocessing
    import time

    context = multiprocessing.get_context("fork")
    best = 0.0
    for _ in range(2):
        alone = best_of(work, 1)
        processes = [context.Process(target=work) for _ in range(2)]
        started = time.perf_counter()
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        best = max(best, 2 * alone / (time.perf_counter() - started))
    return best


def _shard_job(validated: str, output: Path, processes: int) -> float:
    """Rows/s of the whole shard job in a fresh process, as an Airflow task runs it (no TensorFlow loaded)."""
    completed = subprocess.run([sys.executable, "-c", _SHARD_JOB, validated, str(output), str(processes)],
                               capture_output=True, text=True, check=True, cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    return result["rows"] / result["seconds"]


def run(quick: bool = False) -> list[Target]:
    import tensorflow as tf

    from tfjobs.storage.examples import serialize_examples
    from tfjobs.shard import reuse_freed_memory

    reuse_freed_memory()  # as the shard job's processes do (it applies to the anchors measured here too)
    rows = 200_000 if quick else 1_000_000
    job_rows = 400_000 if quick else 4_000_000
    loop_rows = 10_000 if quick else 30_000
    spec = housing_spec({"train": 8, "eval": 2, "test": 2})
    columns = spec.record_columns()
    frame = housing_frame(rows).fillna({"ocean_proximity": ""})
    values = {c.name: frame[c.name].to_numpy() for c in columns}
    values["ocean_proximity"] = values["ocean_proximity"].astype(object)
    # The shard job reads strings from Parquet as categoricals (each distinct value encoded once).
    fast_values = {**values, "ocean_proximity": pd.Categorical(values["ocean_proximity"])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        template = loop_rows / best_of(lambda: _template_loop(columns, values, str(tmp / "m"), loop_rows), 2)
        records = serialize_examples(columns, {k: v[:loop_rows * 5] for k, v in values.items()})

        def write_serialized():
            with tf.io.TFRecordWriter(str(tmp / "s"), options="GZIP") as writer:
                for record in records:
                    writer.write(record)

        serialized = len(records) / best_of(write_serialized, 2)
        plain = rows / best_of(lambda: _fast_path(columns, fast_values, str(tmp / "plain"), ""), 3)
        # The loop and the fast path in turns, best of 3 each: this machine's speed drifts by tens of percent.
        tutorial = gzip = 0.0
        for _ in range(3):
            tutorial = max(tutorial, loop_rows / best_of(lambda: _tutorial_loop(values, columns, str(tmp / "t"),
                                                                                loop_rows), 1))
            gzip = max(gzip, rows / best_of(lambda: _fast_path(columns, fast_values, str(tmp / "gzip"), "GZIP"), 1))
        _check_round_trip(columns, values, str(tmp / "plain"), "")
        _check_round_trip(columns, values, str(tmp / "gzip"), "GZIP")

        validated = write_validated(housing_frame(job_rows).fillna({"ocean_proximity": ""}), spec,
                                    tmp / "validated")
        one = two = 0.0
        for _ in range(3):
            one = max(one, _shard_job(validated, tmp / "shards", 1))
            two = max(two, _shard_job(validated, tmp / "shards", 2))
        cpu_ceiling = _two_process_ceiling(_hash_loop)
        # The fast path itself (NumPy and ISA-L, SIMD-bound), each process writing its own file.
        fast_path_ceiling = _two_process_ceiling(
            lambda: _fast_path(columns, fast_values, str(tmp / f"ceiling-{os.getpid()}"), "GZIP"))
    return [
        Target("fast path, GZIP off", plain, 250_000, "rows/s", "the 250,000 rows/s target", 1.0),
        Target("fast path, GZIP on", gzip, 250_000, "rows/s", "the 250,000 rows/s target", 1.0),
        Target("fast path GZIP on vs tutorial loop", gzip, tutorial, "rows/s", "per-row tf.train.Example", 50.0),
        Target("fast path GZIP on vs template Example", gzip, template, "rows/s", "mutated template Example", 1.0),
        Target("fast path GZIP on vs pre-serialized", gzip, serialized, "rows/s", "TFRecordWriter.write loop", 1.0),
        Target("fast path GZIP on vs tfx-bsl", gzip, TFX_BSL_ROWS_PER_S, "rows/s",
               "tfx-bsl RecordBatchToExamples (published, not run)", 2.0),
        Target("shard job, 2 processes vs 1", two, one, "rows/s", "1 process", 1.6,
               note=f"whole job on {job_rows:,} rows incl. Parquet read and split: {one:,.0f} rows/s with 1 "
                    "process; on this machine "
                    f"two processes vs one get {cpu_ceiling:.2f}x for a cache-resident SHA-256 loop and "
                    f"{fast_path_ceiling:.2f}x for the fast path alone (encode, frame, gzip)"),
    ]
