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
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfjobs import cli
from tfjobs.examples import encode_examples, spec_columns
from tfjobs.spec import SPLITS, PipelineSpec, load_spec
from tfjobs.store import join, local_copy, read_json, read_json_if_exists, sha256_file, staging_dir, store_for
from tfjobs.store import write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
COMPRESSION = "GZIP"
BATCH_ROWS = 65_536
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
    import pandas as pd

    key = list(spec.split.key) or list(spec.columns)
    hashes = pd.util.hash_pandas_object(frame[key], index=False).to_numpy()
    bucket = hashes % np.uint64(_BUCKETS)
    bounds = np.cumsum([spec.split.fractions()[s] for s in SPLITS]) * _BUCKETS
    split = np.searchsorted(bounds[:-1], bucket, side="right")
    return split, hashes // np.uint64(_BUCKETS)


def shard_dataset(spec: PipelineSpec, validated_uri: str, output_uri: str) -> ShardResult:
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
        splits = _write_shards(spec, parquet_path, tmp)
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


def _write_shards(spec: PipelineSpec, parquet_path: Path, out_dir: Path) -> dict:
    import pyarrow.parquet as pq
    import tensorflow as tf

    columns = spec_columns(spec)
    files = {
        split: [shard_file_name(split, i, spec.shards[split]) for i in range(spec.shards[split])] for split in SPLITS
    }
    counts = {split: [0] * len(names) for split, names in files.items()}
    writers = {}
    for names in files.values():
        for name in names:
            (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
            writers[name] = tf.io.TFRecordWriter(str(out_dir / name), options=COMPRESSION)
    try:
        for batch in pq.ParquetFile(parquet_path).iter_batches(batch_size=BATCH_ROWS):
            frame = batch.to_pandas()
            split_index, shard_hash = split_assignment(spec, frame)
            values = {c.name: frame[c.name].to_numpy() for c in columns}
            data, lengths = encode_examples(columns, values)
            ends = np.cumsum(lengths)
            buffer = data.tobytes()
            for s, split in enumerate(SPLITS):
                rows = np.flatnonzero(split_index == s)
                shard_of_row = (shard_hash[rows] % np.uint64(len(files[split]))).astype(np.int64)
                for row, shard in zip(rows.tolist(), shard_of_row.tolist()):
                    writers[files[split][shard]].write(buffer[ends[row] - lengths[row] : ends[row]])
                counts[split] = [c + int(n) for c, n in zip(counts[split], np.bincount(shard_of_row, minlength=len(files[split])))]
    finally:
        for writer in writers.values():
            writer.close()
    return {
        split: {
            "records": sum(counts[split]),
            "shards": [
                {
                    "file": name,
                    "records": count,
                    "bytes": (out_dir / name).stat().st_size,
                    "sha256": sha256_file(out_dir / name),
                }
                for name, count in zip(files[split], counts[split])
            ],
        }
        for split in SPLITS
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--validated", required=True, help="validated data prefix URI (the validate step's output)")
    parser.add_argument("--output", required=True, help="output prefix URI")
    args = cli.parse(parser, argv)
    cli.print_result(shard_dataset(load_spec(args.spec), args.validated, args.output))


if __name__ == "__main__":
    main()
