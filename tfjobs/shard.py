"""Split validated rows and write them as GZIP TFRecord shards of ``tf.train.Example``.

(Of ``tf.train.SequenceExample`` when a feature is stored as a document: a text feature with
``storage: sequence_example``, see :mod:`tfjobs.storage.sequence_examples`. The manifest's
``record_format`` says which; the readers parse accordingly.)

Reads ``validated/<dataset>/<partition>/data.parquet`` in record batches (memory
stays flat however many rows there are; several processes take a run of row
groups each) and writes::

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
import ctypes
import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tfjobs import cli
from tfjobs.storage.examples import Column, encode_padded
from tfjobs.storage.sequence_examples import SEQUENCE_EXAMPLE, encode_framed_sequence_examples, record_format
from tfjobs.spec import SPLITS, PipelineSpec, load_spec
from tfjobs.storage.store import join, local_copy, read_json, read_json_if_exists, staging_dir, store_for
from tfjobs.storage.store import write_json
from tfjobs.storage.tfrecord import COMPRESSION, FRAMING, TFRecordFileWriter, frame_in_place

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
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
        "record_format": record_format(spec.record_columns()),
        "columns": [{"name": c.name, "dtype": c.dtype, **({"document": True} if c.document else {})}
                    for c in spec.record_columns()],
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
    """Write every shard; with several processes, each takes a contiguous run of Parquet row groups.

    Each process writes its part of every shard; the parts are then joined in row
    group order. Every row group's records of a shard form their own gzip member, so
    the joined file is the same bytes as one process writes, however many there were.
    """
    import pyarrow.parquet as pq

    names = _shard_names(spec)
    for name in names:
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    metadata = pq.ParquetFile(parquet_path).metadata
    runs = _row_group_runs([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)], processes)
    suffixes = [""] + [f".part{k}" for k in range(1, len(runs))]  # the first part is written in place
    # One process: pyarrow's threads decode Parquet on every core; several: one thread each, or they oversubscribe.
    parquet_threads = len(runs) == 1
    jobs = [(spec, str(parquet_path), str(out_dir), run, suffix, parquet_threads)
            for run, suffix in zip(runs, suffixes)]
    if len(jobs) == 1:
        writers = _write_row_groups(*jobs[0])
        shards = [{"records": w.records, "bytes": w.bytes, "sha256": w.sha256} for w in writers]
    else:
        # fork is fast, but not safe once TensorFlow's threads exist in this process: then spawn.
        context = multiprocessing.get_context("spawn" if "tensorflow" in sys.modules else "fork")
        pool = concurrent.futures.ProcessPoolExecutor(len(jobs) - 1, mp_context=context)
        try:
            others = pool.map(_count_row_groups_written, *zip(*jobs[1:]))
            writers = _write_row_groups(*jobs[0])  # the first run in this process, meanwhile
            others = list(others)
        finally:
            pool.shutdown(wait=False)  # the workers exit while the parts are joined
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as threads:
            joined = list(threads.map(lambda name, writer: _join_parts(out_dir / name, suffixes[1:], writer),
                                      names, writers))
        shards = [{"records": writers[i].records + sum(other[i] for other in others), **file}
                  for i, file in enumerate(joined)]
    splits, index = {}, 0
    for split in SPLITS:
        written = [{"file": names[i], **shards[i]} for i in range(index, index + spec.shards[split])]
        index += spec.shards[split]
        splits[split] = {"records": sum(shard["records"] for shard in written), "shards": written}
    return splits


def _shard_names(spec: PipelineSpec) -> list[str]:
    return [shard_file_name(split, i, spec.shards[split]) for split in SPLITS for i in range(spec.shards[split])]


def _row_group_runs(group_rows: list[int], processes: int) -> list[range]:
    """Contiguous runs of row groups, one per process, of about equal row counts."""
    before = np.concatenate([[0], np.cumsum(group_rows)])  # rows before each row group boundary
    processes = max(1, min(processes, len(group_rows)))
    targets = before[-1] * np.arange(1, processes) / processes
    nearest = np.abs(before[None, :] - targets[:, None]).argmin(axis=1)
    edges = [0, *sorted(set(nearest.tolist()) - {0, len(group_rows)}), len(group_rows)]
    return [range(start, stop) for start, stop in zip(edges[:-1], edges[1:])]


def _join_parts(path: Path, suffixes: list[str], writer: TFRecordFileWriter) -> dict:
    """Append the parts ``path<suffix>`` to ``path``, which ``writer`` wrote, then delete them.

    The file's SHA-256 goes on from the writer's, over the parts' bytes as they are copied.
    """
    digest = writer.hash_state()
    with open(path, "ab") as out:
        for suffix in suffixes:
            part = path.with_name(path.name + suffix)
            with open(part, "rb") as source:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            part.unlink()
        size = out.tell()
    return {"bytes": size, "sha256": digest.hexdigest()}


def _count_row_groups_written(*args) -> list[int]:
    """``_write_row_groups`` in a worker process: the records written to each shard's part."""
    return [writer.records for writer in _write_row_groups(*args)]


def _write_row_groups(spec: PipelineSpec, parquet_path: str, out_dir: str, row_groups: range,
                      suffix: str, threads: bool = True) -> list[TFRecordFileWriter]:
    """Read the row groups ``row_groups``, and write their records of every shard to ``<shard file><suffix>``.

    Each (row group, shard) pair's records form one gzip member, whatever the batches.
    ``threads``: whether pyarrow decodes with its thread pool (not when a process per core runs).
    Returns the closed writers, one per shard: what each wrote (records, bytes, SHA-256).
    """
    import pyarrow.parquet as pq

    reuse_freed_memory()
    columns = spec.record_columns()
    names = _shard_names(spec)
    first_shard = np.cumsum([0] + [spec.shards[split] for split in SPLITS])[:-1]
    shards_per_split = np.array([spec.shards[split] for split in SPLITS], np.uint64)
    writers = [TFRecordFileWriter(Path(out_dir) / (name + suffix), COMPRESSION) for name in names]
    member_of = [-1] * len(names)  # the row group whose records each writer's open gzip member holds
    pending: list[list] = [[] for _ in names]  # and those records, framed, not yet compressed

    def finish_member(index: int) -> None:
        # Compressed in one call: a member's bytes do not depend on where batches cut it.
        if pending[index]:
            parts = [part for part, _ in pending[index]]
            framed = parts[0] if len(parts) == 1 else np.concatenate(parts)
            writers[index].write_framed(framed, sum(records for _, records in pending[index]))
            pending[index] = []
        writers[index].end_member()

    try:
        # pre_buffer=False: pyarrow would otherwise buffer every row group ahead (memory grows with the file).
        parquet = pq.ParquetFile(parquet_path, pre_buffer=False)
        group_ends = np.cumsum([parquet.metadata.row_group(g).num_rows for g in row_groups])
        read = 0
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=list(row_groups),
                                          columns=list(spec.columns), use_threads=threads):
            # Strings as categoricals: each distinct value is hashed and encoded once.
            frame = batch.to_pandas(strings_to_categorical=True, use_threads=threads)
            split_index, shard_hash = split_assignment(spec, frame)
            shard = first_shard[split_index] + (shard_hash % shards_per_split[split_index]).astype(np.int64)
            group = np.searchsorted(group_ends, np.arange(read, read + len(frame)), side="right")
            read += len(frame)
            # Rows of each (row group, shard) together, in input order: each is one slice of the batch.
            key = group * len(names) + shard
            order = np.argsort(key, kind="stable")
            key = key[order]
            framed, lengths = framed_records(columns, {c.name: _column(frame[c.name])[order] for c in columns})
            offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
            bounds = [0, *(np.flatnonzero(np.diff(key)) + 1).tolist(), len(key)]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                member, index = divmod(int(key[start]), len(names))
                if member_of[index] != member:
                    finish_member(index)
                    member_of[index] = member
                pending[index].append((framed[offsets[start] : offsets[stop]], stop - start))
            for index in range(len(names)):  # members of row groups that ended in this batch are complete
                if member_of[index] < group[-1]:
                    finish_member(index)
        for index in range(len(names)):
            finish_member(index)
    finally:
        for writer in writers:
            writer.close()
    return writers


def framed_records(columns: list[Column], values: dict) -> tuple[np.ndarray, np.ndarray]:
    """The batch's records in TFRecord framing, all at once: (their bytes back to back, each one's length).

    Examples; SequenceExamples when a column is stored as a document.
    """
    if record_format(columns) == SEQUENCE_EXAMPLE:
        return encode_framed_sequence_examples(columns, values)
    rows = encode_padded(columns, values, reserve=FRAMING)
    return frame_in_place(rows), rows.lengths


def reuse_freed_memory() -> None:
    """Keep freed memory in this process for the next batch, instead of handing it back to the OS.

    Each batch allocates arrays of tens of MiB; glibc returns such blocks to the OS on
    free, so the next batch's first touch of every page faults (measured: a third of
    the encode time, ``benchmarks/bench_shard.py``). Peak memory is unchanged.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MiB come from the heap
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # and the heap is not trimmed below 1 GiB free
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


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
