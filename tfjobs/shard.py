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
Within a shard, each Parquet row group's rows are sorted by that hash mixed with
``training.seed`` (``shard_assignment``): a shard read front to back is shuffled (a label- or
time-sorted input included), the same way for the same input and seed, whatever
the batches and the number of processes. Memory follows bytes, not rows: long
values are read fewer rows at a time, and framed without widening other rows.
When the source assigns the splits (``split.column``: TFDS's ``train[:90%]``), that
column decides, and the hash only picks a row's shard within its split.
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
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tfjobs import cli
from tfjobs.storage.examples import DISTINCT_VALUE_BYTES, Column, encode_rows
from tfjobs.storage.sequence_examples import SEQUENCE_EXAMPLE, encode_framed_sequence_examples, record_format
from tfjobs.spec import SPLITS, PipelineSpec, load_spec
from tfjobs.storage.store import holding_staging_dir, join, local_copy, read_json, read_json_if_exists, staging_dir
from tfjobs.storage.store import store_for, write_json
from tfjobs.storage.tfrecord import COMPRESSION, FramedRecords, TFRecordFileWriter, frame_in_chunks, gzip_level

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BATCH_ROWS = 65_536  # rows read at a time, at most
GROUP_BYTES = 16 << 20  # a row group with at most this many bytes of values (uncompressed) is read whole
BATCH_BYTES = 4 << 20  # a bigger one this many at a time (long values: fewer rows)
READ_BUFFER_BYTES = 1 << 20  # Parquet pages are read through a buffer this big, not a whole column chunk at once
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


def shard_assignment(spec: PipelineSpec, frame, first: int = 0, group_rows: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's shard (an index into the shard files of every split, in ``SPLITS`` order) and its order.

    ``frame`` holds rows ``first``, ``first + 1``, ... of a row group of ``group_rows`` rows (all of
    it by default). The order is a uint64 per row, unique in its row group, that sorts its rows by
    shard, then by the row's hash mixed with ``training.seed``, then by position: a shard holds each
    row group's rows in that order, so reading it front to back is already shuffled, the same way
    for the same input and seed.
    """
    split, shard_hash = split_assignment(spec, frame)
    first_shard = np.cumsum([0] + [spec.shards[s] for s in SPLITS])[:-1]
    shards_per_split = np.array([spec.shards[s] for s in SPLITS], np.uint64)
    shard = first_shard[split] + (shard_hash % shards_per_split[split]).astype(np.int64)
    shard_bits = int(sum(spec.shards.values()) - 1).bit_length()
    position_bits = int(max(group_rows or len(frame), 1) - 1).bit_length()
    hash_bits = 64 - shard_bits - position_bits
    if hash_bits < 16:
        raise ValueError(f"{sum(spec.shards.values())} shards and row groups of {group_rows} rows leave too few bits "
                         "to shuffle rows by: write smaller row groups")
    order = _mix(shard_hash, spec.training.seed) >> np.uint64(64 - hash_bits) << np.uint64(position_bits)
    order |= shard.astype(np.uint64) << np.uint64(hash_bits + position_bits)
    return shard, order | np.arange(first, first + len(frame), dtype=np.uint64)


def _mix(values: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 of ``values`` offset by ``seed``: uint64s that look random, and change with the seed."""
    with np.errstate(over="ignore"):
        z = values + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_assignment(spec: PipelineSpec, frame) -> tuple[np.ndarray, np.ndarray]:
    """Each row's split index (into ``SPLITS``) and a hash for picking its shard."""
    key = list(spec.split.key) or list(spec.columns)
    # categorize=False: the same hashes, without factorizing long strings first (categoricals hash their categories).
    hashes = pd.util.hash_pandas_object(frame[key], index=False, categorize=False).to_numpy()
    if spec.split.column:  # validated: every value is one of SPLITS
        split = pd.Categorical(frame[spec.split.column], categories=SPLITS).codes.astype(np.int64)
        return split, hashes // np.uint64(_BUCKETS)
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
    """Write every shard into the staging directory ``out_dir``; with several processes, each takes a
    contiguous run of Parquet row groups.

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
        pool = concurrent.futures.ProcessPoolExecutor(len(jobs) - 1, mp_context=context,
                                                      initializer=die_with_parent, initargs=(os.getpid(),))
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


def _count_row_groups_written(spec: PipelineSpec, parquet_path: str, out_dir: str, *args) -> list[int]:
    """``_write_row_groups`` in a worker process: the records written to each shard's part.

    The worker holds the staging directory's lock while it writes: if the job is killed and the
    worker goes on a while, the directory is not reclaimed under it, but as soon as it exits.
    """
    with holding_staging_dir(out_dir):
        return [writer.records for writer in _write_row_groups(spec, parquet_path, out_dir, *args)]


def _write_row_groups(spec: PipelineSpec, parquet_path: str, out_dir: str, row_groups: range,
                      suffix: str, threads: bool = True) -> list[TFRecordFileWriter]:
    """Read the row groups ``row_groups``, and write their records of every shard to ``<shard file><suffix>``.

    Each (row group, shard) pair's records form one gzip member, in the order ``shard_assignment``
    gives them, whatever the batches. ``threads``: whether pyarrow decodes with its thread pool
    (not when a process per core runs).
    Returns the closed writers, one per shard: what each wrote (records, bytes, SHA-256).
    """
    import pyarrow.parquet as pq

    reuse_freed_memory()
    columns = spec.record_columns()
    names = _shard_names(spec)
    writers = [TFRecordFileWriter(Path(out_dir) / (name + suffix), COMPRESSION, gzip_level(columns)) for name in names]
    # Each shard's records of this row group, framed, not yet compressed: (bytes, their places, their lengths).
    pending: list[list] = [[] for _ in names]

    def finish_member(index: int) -> None:
        # Compressed in one call: a member's bytes do not depend on where batches cut it.
        if pending[index]:
            framed = _in_place_order(pending[index])
            writers[index].write_framed(framed, sum(len(places) for _, places, _ in pending[index]))
            pending[index] = []
        writers[index].end_member()

    try:
        # pre_buffer=False and a read buffer: pyarrow would otherwise hold every row group, or a whole
        # column chunk, in memory at once (memory grows with the file, or with the longest column).
        parquet = pq.ParquetFile(parquet_path, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
        for group in row_groups:
            metadata, read = parquet.metadata.row_group(group), 0
            for batch in parquet.iter_batches(batch_size=_batch_rows(metadata), row_groups=[group],
                                              columns=[*spec.columns, *spec.split_columns], use_threads=threads):
                frame = _frame(batch, threads)
                del batch
                shard, place = shard_assignment(spec, frame, read, metadata.num_rows)
                read += len(frame)
                order = np.argsort(place)  # each shard's rows together, in their places (each place is unique)
                framed = framed_records(columns, {c.name: _column(frame[c.name]) for c in columns}, order)
                del frame
                shard, place = shard[order], place[order]
                for first, stop, data in framed.runs(shard):
                    lengths = framed.end[first:stop] - framed.start[first:stop]
                    pending[shard[first]].append((data, place[first:stop], lengths))
                del framed
            for index in range(len(names)):  # the row group's members are complete
                finish_member(index)
    finally:
        for writer in writers:
            writer.close()
    return writers


def _in_place_order(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """A member's framed records, sorted by place: each batch's parts are; the batches of a row group
    too big to read whole are merged (one copy of the member, a Python step per record)."""
    places = np.concatenate([places for _, places, _ in parts])
    if (places[1:] > places[:-1]).all():
        return parts[0][0] if len(parts) == 1 else np.concatenate([data for data, _, _ in parts])
    views = [memoryview(data) for data, _, _ in parts]
    part = np.repeat(np.arange(len(parts)), [len(places) for _, places, _ in parts])
    ends = np.concatenate([np.cumsum(lengths) for _, _, lengths in parts])
    lengths = np.concatenate([lengths for _, _, lengths in parts])
    order = np.argsort(places)
    records = zip(part[order].tolist(), ends[order].tolist(), lengths[order].tolist())
    return np.frombuffer(b"".join([views[p][e - n : e] for p, e, n in records]), np.uint8)


def _batch_rows(row_group) -> int:
    """Rows to read at a time: the whole row group when it holds at most ``GROUP_BYTES`` (then its
    members need no merging), else about ``BATCH_BYTES`` of values at a time."""
    size = max(row_group.total_byte_size, 1)  # uncompressed
    if size <= GROUP_BYTES:
        return max(1, min(BATCH_ROWS, row_group.num_rows))
    return int(max(1, min(BATCH_ROWS, BATCH_BYTES * row_group.num_rows // size)))


def _frame(batch, threads: bool) -> pd.DataFrame:
    """A record batch as pandas: strings as categoricals (each distinct value hashed and encoded once),
    long ones as their UTF-8 bytes, one per row (finding the repeats would cost more than it saves;
    bytes hash as their string does, and go into records as they are)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    long = [name for name, column in zip(batch.schema.names, batch.columns)
            if pa.types.is_string(column.type) and len(column)
            and pc.sum(pc.binary_length(column)).as_py() >= DISTINCT_VALUE_BYTES * len(column)]
    frame = batch.drop_columns(long).to_pandas(strings_to_categorical=True, use_threads=threads)
    for name in long:
        values = batch.column(name).cast(pa.binary()).to_numpy(zero_copy_only=False)
        frame[name] = pd.Series(values, dtype=object, index=frame.index)
    return frame


def framed_records(columns: list[Column], values: dict, order: np.ndarray | None = None) -> FramedRecords:
    """The batch's records in ``order`` (all, as given, when None), in TFRecord framing: Examples, built a chunk at a time
    (:func:`~tfjobs.storage.tfrecord.frame_in_chunks`); SequenceExamples when a column is stored as a
    document (their pieces are as long as their values: nothing is padded).
    """
    if record_format(columns) == SEQUENCE_EXAMPLE:
        ordered = values if order is None else {name: v[order] for name, v in values.items()}
        data, lengths = encode_framed_sequence_examples(columns, ordered)
        ends = np.cumsum(lengths)
        return FramedRecords([data], np.zeros(len(lengths), np.int64), ends - lengths, ends)
    return frame_in_chunks(encode_rows(columns, values), order)


def die_with_parent(parent: int) -> None:
    """A worker's initializer: the kernel kills the worker when the job's process dies (Linux).

    A job killed with SIGKILL cannot stop its pool, and its workers would wait for work for good
    (measured: an orphaned worker of a killed shard run still held its 7.5 MB staging directory
    and its memory after minutes).
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: no such call
        return
    if os.getppid() != parent:  # the job died before the call
        os._exit(1)


_PR_SET_PDEATHSIG = 1


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
