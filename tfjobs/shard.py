"""Split validated rows and write them as GZIP TFRecord shards of ``tf.train.Example``.

Reads ``validated/<dataset>/<partition>/data.parquet`` in record batches (memory
stays flat however many rows there are) and writes::

    shards/<dataset>/<partition>/train/part-00000-of-00004.tfrecord.gz
                                 eval/part-00000-of-00001.tfrecord.gz
                                 test/part-00000-of-00001.tfrecord.gz
                                 manifest.json      (written last)

The split is decided by a hash of each row's key columns (the whole row by
default), so it does not depend on row order or chunking, duplicate rows never
straddle train and test, and a re-run with the same input writes the same bytes.
The manifest holds per-split record counts, the feature schema and a SHA-256 per
shard; readers take a shard set as finished only when its manifest is there.

    python -m tfjobs.shard --spec include/penguins.yaml --validated <store>/validated/penguins/2026-11-25 \\
        --output <store>/shards/penguins/2026-11-25
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tfjobs import cli
from tfjobs.examples import encode_padded, spec_columns
from tfjobs.spec import SPLITS, PipelineSpec, load_spec
from tfjobs.store import join, local_copy, read_json, read_json_if_exists, staging_dir, store_for
from tfjobs.store import write_json
from tfjobs.tfrecord import FRAMING, TFRecordFileWriter

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPRESSION = "GZIP"
BATCH_ROWS = 65_536
PROCESS_MIN_ROWS = 500_000  # below this, starting a process costs more than it saves
_BUCKETS = 10_000


@dataclass(frozen=True)
class ShardResult:
    manifest_uri: str
    records: dict[str, int]
    shards: int
    rewritten: bool


def shard_file_name(split: str, index: int, count: int) -> str:
    return f"{split}/part-{index:05d}-of-{count:05d}.tfrecord.gz"


def split_assignment(spec: PipelineSpec, frame) -> tuple[np.ndarray, np.ndarray]:
    """Each row's split index (into ``SPLITS``) and a hash for picking its shard."""
    key = list(spec.split.key) or list(spec.columns)
    hashes = pd.util.hash_pandas_object(frame[key], index=False).to_numpy()
    bucket = hashes % np.uint64(_BUCKETS)
    bounds = np.cumsum([spec.split.fractions()[s] for s in SPLITS]) * _BUCKETS
    split = np.searchsorted(bounds[:-1], bucket, side="right")
    return split, hashes // np.uint64(_BUCKETS)


def shard_dataset(spec: PipelineSpec, validated_uri: str, output_uri: str, processes: int = 0) -> ShardResult:
    """Shard the validated rows; ``processes`` 0 picks one per core when the data is big enough."""
    report_uri = join(validated_uri, "report.json")
    if not store_for(report_uri).exists(report_uri):
        raise FileNotFoundError(f"No validated data at {validated_uri} (no report.json): run the validate step first")
    report = read_json(report_uri)
    manifest_uri = join(output_uri, MANIFEST)
    previous = read_json_if_exists(manifest_uri)
    if previous and previous["input_sha256"] == report["data_sha256"] and previous["spec"] == spec.fingerprint():
        log.info("Shards at %s are up to date; nothing rewritten", output_uri)
        return _result(manifest_uri, previous, rewritten=False)

    store = store_for(output_uri)
    store.delete(manifest_uri)
    with local_copy(join(validated_uri, report["data_file"])) as parquet_path, staging_dir() as tmp:
        splits = _write_shards(spec, parquet_path, tmp, processes or default_processes(report["rows_valid"]))
        for split in splits.values():
            for shard in split["shards"]:
                store.upload(tmp / shard["file"], join(output_uri, shard["file"]))
    manifest = {
        "dataset": spec.name,
        "spec": spec.fingerprint(),
        "input_sha256": report["data_sha256"],
        "compression": COMPRESSION,
        "columns": [{"name": c.name, "dtype": c.dtype} for c in spec_columns(spec)],
        "label": spec.label.name,
        "splits": splits,
    }
    write_json(manifest_uri, manifest)
    result = _result(manifest_uri, manifest, rewritten=True)
    log.info("Wrote %d shards to %s: %s records", result.shards, output_uri, result.records)
    return result


def _result(manifest_uri: str, manifest: dict, rewritten: bool) -> ShardResult:
    splits = manifest["splits"]
    return ShardResult(
        manifest_uri=manifest_uri,
        records={name: split["records"] for name, split in splits.items()},
        shards=sum(len(split["shards"]) for split in splits.values()),
        rewritten=rewritten,
    )


def _write_shards(spec: PipelineSpec, parquet_path: Path, out_dir: Path, processes: int) -> dict:
    """Write every shard; with several processes, each writes the shards ``i`` with ``i % processes == k``."""
    names = _shard_names(spec)
    for name in names:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    processes = max(1, min(processes, len(names)))
    if processes == 1:
        written = _write_shard_subset(spec, str(parquet_path), str(out_dir), 0, 1)
    else:
        # fork is fast, but not safe once TensorFlow's threads exist in this process: then spawn.
        context = multiprocessing.get_context("spawn" if "tensorflow" in sys.modules else "fork")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            parts = pool.map(_write_shard_subset, [spec] * processes, [str(parquet_path)] * processes,
                             [str(out_dir)] * processes, range(processes), [processes] * processes)
            written = {index: shard for part in parts for index, shard in part.items()}
    splits, index = {}, 0
    for split in SPLITS:
        shards = [written[i] for i in range(index, index + spec.shards[split])]
        index += spec.shards[split]
        splits[split] = {"records": sum(shard["records"] for shard in shards), "shards": shards}
    return splits


def _shard_names(spec: PipelineSpec) -> list[str]:
    return [shard_file_name(split, i, spec.shards[split]) for split in SPLITS for i in range(spec.shards[split])]


def _write_shard_subset(spec: PipelineSpec, parquet_path: str, out_dir: str, worker: int, workers: int) -> dict:
    """Read every row, keep those of this worker's shards, encode and write them.

    Returns ``{shard index: {"file", "records", "bytes", "sha256"}}`` for this worker's shards.
    """
    import pyarrow.parquet as pq

    columns = spec_columns(spec)
    names = _shard_names(spec)
    first_shard = np.cumsum([0] + [spec.shards[split] for split in SPLITS])[:-1]
    shards_per_split = np.array([spec.shards[split] for split in SPLITS], np.uint64)
    writers = {i: TFRecordFileWriter(Path(out_dir) / names[i], COMPRESSION) for i in range(len(names))
               if i % workers == worker}
    try:
        # pre_buffer=False: pyarrow would otherwise buffer every row group ahead (memory grows with the file).
        parquet = pq.ParquetFile(parquet_path, pre_buffer=False)
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(spec.columns)):
            # Strings as categoricals: each distinct value is hashed and encoded once.
            frame = batch.to_pandas(strings_to_categorical=True)
            split_index, shard_hash = split_assignment(spec, frame)
            shard = first_shard[split_index] + (shard_hash % shards_per_split[split_index]).astype(np.int64)
            keep = np.flatnonzero(shard % workers == worker)
            if not len(keep):
                continue
            # Rows of each shard together, in input order, so that each shard's records are one slice.
            keep = keep[np.argsort(shard[keep], kind="stable")]
            shard = shard[keep]
            values = {c.name: _column(frame[c.name])[keep] for c in columns}
            rows = encode_padded(columns, values, reserve=FRAMING)
            bounds = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(shard)]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                writers[int(shard[start])].write(rows.rows(start, stop))
    finally:
        for writer in writers.values():
            writer.close()
    return {i: {"file": names[i], "records": w.records, "bytes": w.bytes, "sha256": w.sha256}
            for i, w in writers.items()}


def _column(series):
    """A column's values: its pd.Categorical when it is one, else a NumPy array."""
    return series.array if isinstance(series.dtype, pd.CategoricalDtype) else series.to_numpy()


def default_processes(rows: int) -> int:
    """One process per core, but only when there are enough rows to repay starting them."""
    return max(1, min(os.cpu_count() or 1, rows // PROCESS_MIN_ROWS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--validated", required=True, help="validated data prefix URI (the validate step's output)")
    parser.add_argument("--output", required=True, help="output prefix URI")
    parser.add_argument("--processes", type=int, default=0, help="worker processes (default: by size, up to one per core)")
    args = cli.parse(parser, argv)
    cli.print_result(shard_dataset(load_spec(args.spec), args.validated, args.output, args.processes))


if __name__ == "__main__":
    main()
