"""tf.data input pipelines over TFRecord shards, on local disk or on an object store.

TensorFlow 2.21 reads local files only (it has no ``s3://`` filesystem), so a
:class:`ShardSet` gives tf.data local files in one of three ways:

- ``local``: the store is the local filesystem; the shards are read in place;
- ``stage``: the split is small (below ``stage_limit_bytes``); every shard is
  downloaded once, concurrently, checked against the manifest's SHA-256, and kept
  for the duration of the block;
- ``stream``: shards are downloaded ahead, concurrently, into a bounded local
  cache while tf.data reads the ones already there; each file is deleted as soon
  as tf.data has read it to the end, so the cache never exceeds its size limit
  (plus one shard) whatever the dataset's size. A parallel ``interleave`` over
  ``cycle`` files holds up to about three times ``cycle`` files open or queued, so
  the cycle is sized to the cache (at least 4 shards fit; a smaller limit is raised
  to that) and the download loop can never wait on files tf.data still needs.

``raw_batches`` yields batches of raw feature values (the dtypes of the serving
signature); ``training_batches`` turns them into what the training model eats.
Records are ``tf.train.Example``s, or ``tf.train.SequenceExample``s when the
manifest's ``record_format`` says so (:func:`record_parser`): a document (text
stored as sentences of tokens) is read back as its text.
Shards are read concurrently (``interleave``), records are parsed a batch at a
time (``parse_example`` on a batch is an order of magnitude faster than one record
at a time), and everything is prefetched so that the model does not wait.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tfjobs.storage.examples import Column, parse_features
from tfjobs.storage.sequence_examples import EXAMPLE, SEQUENCE_EXAMPLE, parse_sequence_examples
from tfjobs.storage.store import STAGING_PREFIX, StagingDir, join, read_json, store_for
from tfjobs.storage.tfrecord import COMPRESSION

log = logging.getLogger(__name__)

STAGE_LIMIT_BYTES = 256 << 20
CACHE_LIMIT_BYTES = 512 << 20
DOWNLOAD_WORKERS = 8
READERS = max(2, os.cpu_count() or 2)  # files read at once
BLOCK_RECORDS = 256  # records a reader hands over at a time
REMIX_WINDOWS = 8  # cached windows whose rows are permuted together, each epoch
FILES_PER_CYCLE = 4  # files a streamed cache must hold per interleave cycle slot
STALL_TIMEOUT_S = 600


def manifest_columns(manifest: dict) -> list[Column]:
    return [Column(c["name"], c["dtype"], c.get("document", False)) for c in manifest["columns"]]


def record_parser(columns: list[Column], record_format: str = EXAMPLE):
    """``parse(records)``: a batch of serialized records -> one 1-D tensor per column, as the manifest's
    ``record_format`` stores them (a ``SequenceExample``'s documents come back as text)."""
    import tensorflow as tf

    if record_format == SEQUENCE_EXAMPLE:
        return lambda records: parse_sequence_examples(records, columns)
    if record_format != EXAMPLE:
        raise ValueError(f"Shards of record format {record_format!r}: this reader knows {EXAMPLE!r} and "
                         f"{SEQUENCE_EXAMPLE!r}")
    features = parse_features(columns)
    return lambda records: tf.io.parse_example(records, features)


class ChecksumMismatchError(IOError):
    """A downloaded shard does not match the SHA-256 in its manifest."""


class ShardSet:
    """One split's shards, as local files for tf.data; use it as a context manager."""

    def __init__(
        self,
        manifest_uri: str,
        split: str,
        *,
        mode: str = "auto",
        stage_limit_bytes: int = STAGE_LIMIT_BYTES,
        cache_limit_bytes: int = CACHE_LIMIT_BYTES,
        workers: int = DOWNLOAD_WORKERS,
    ):
        self.manifest_uri = manifest_uri
        self.split = split
        self.manifest = read_json(manifest_uri)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{manifest_uri} has no split {split!r}; it has {sorted(self.manifest['splits'])}")
        self.shards = self.manifest["splits"][split]["shards"]
        self.records = self.manifest["splits"][split]["records"]
        self.columns = manifest_columns(self.manifest)
        self.parse = record_parser(self.columns, self.manifest.get("record_format", EXAMPLE))
        base = manifest_uri.rsplit("/", 1)[0]
        self.uris = [join(base, shard["file"]) for shard in self.shards]
        self.store = store_for(manifest_uri)
        total = sum(shard["bytes"] for shard in self.shards)
        if mode == "auto":
            if self.store.local_path(manifest_uri) is not None:
                mode = "local"
            else:
                mode = "stage" if total <= stage_limit_bytes else "stream"
        if mode not in ("local", "stage", "stream"):
            raise ValueError(f"mode must be auto, local, stage or stream; got {mode!r}")
        self.mode = mode
        self.cycle = min(len(self.uris), READERS) or 1
        largest = max((shard["bytes"] for shard in self.shards), default=0)
        if mode == "stream":
            self.cycle = max(1, min(self.cycle, cache_limit_bytes // (FILES_PER_CYCLE * largest or 1)))
            if cache_limit_bytes < FILES_PER_CYCLE * self.cycle * largest:
                log.warning("Streaming cache limit %d B is below %d shards of %d B; using %d B",
                            cache_limit_bytes, FILES_PER_CYCLE, largest, FILES_PER_CYCLE * largest)
                cache_limit_bytes = FILES_PER_CYCLE * self.cycle * largest
        self.cache_limit_bytes = cache_limit_bytes
        self.workers = workers
        self._tmp: StagingDir | None = None
        self._paths: list[str] = []
        self._stream: ShardStream | None = None

    def __enter__(self) -> ShardSet:
        if self.mode == "local":
            self._paths = [str(self.store.local_path(uri)) for uri in self.uris]
            return self
        self._tmp = StagingDir(prefix=f"{STAGING_PREFIX}{self.split}-")
        if self.mode == "stage":
            self._paths = [str(self._tmp.path / f"{i:05d}.tfrecord.gz") for i in range(len(self.uris))]
            with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(self._download, range(len(self.uris)), self._paths))
            log.info("Staged %d %s shards from %s", len(self._paths), self.split, self.manifest_uri)
        else:
            self._stream = ShardStream(self, self._tmp.path)
        return self

    def __exit__(self, *exc) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    @property
    def files(self) -> list[str]:
        """Local paths of every shard (``local`` and ``stage`` modes)."""
        if self.mode == "stream":
            raise ValueError("A streamed shard set has no stable local files; use record_dataset()")
        return self._paths

    def _download(self, index: int, path: str) -> None:
        """Download one shard and check it against the manifest, retrying a corrupt copy once."""
        shard = self.shards[index]
        for attempt in (1, 2):
            if self.store.download_sha256(self.uris[index], path, shard["bytes"]) == shard["sha256"]:
                return
            log.warning("Shard %s failed its checksum (attempt %d)", self.uris[index], attempt)
        raise ChecksumMismatchError(f"{self.uris[index]} does not match the SHA-256 in {self.manifest_uri}")

    def record_blocks(self, *, shuffle: bool = False, seed: int | None = None, deterministic: bool = False):
        """Serialized records in blocks of up to ``BLOCK_RECORDS``, read from ``cycle`` files at a time.

        Measured on 2 cores (benchmarks/bench_input.py): handing records one by one
        between a parallel interleave's threads costs more than reading them, and one
        reader alone is held back by GZIP; readers that each hand over blocks of a few
        hundred records, one per core, read twice as fast as a plain TFRecordDataset.
        With ``shuffle`` the file order changes every epoch, and the readers hand over
        whichever block is ready first, unless ``deterministic`` (then in turn).
        """
        import tensorflow as tf

        def blocks(path):
            return tf.data.TFRecordDataset(path, compression_type=COMPRESSION).batch(BLOCK_RECORDS)

        if self._stream is not None:
            stream = self._stream
            files, reader = stream.dataset(shuffle=shuffle, seed=seed), lambda path: stream.released_after(
                blocks(path), path)
        else:
            files, reader = tf.data.Dataset.from_tensor_slices(self._paths), blocks
            if shuffle:
                files = files.shuffle(len(self._paths), seed=seed, reshuffle_each_iteration=True)
        return files.interleave(
            reader,
            cycle_length=self.cycle,
            num_parallel_calls=self.cycle,
            deterministic=deterministic or not shuffle,
        )

    def record_dataset(self, *, shuffle: bool = False, seed: int | None = None):
        """Serialized records, one by one (see :meth:`record_blocks` for speed)."""
        return self.record_blocks(shuffle=shuffle, seed=seed).unbatch()


class ShardStream:
    """Downloads shards ahead into a bounded cache; tf.data releases each file once read."""

    def __init__(self, shard_set: ShardSet, cache_dir: Path):
        self.shard_set = shard_set
        self.cache_dir = cache_dir
        self.limit = shard_set.cache_limit_bytes
        self.pool = concurrent.futures.ThreadPoolExecutor(shard_set.workers, thread_name_prefix="shard-download")
        self.space = threading.Condition()
        self.cached_bytes = 0
        self.peak_bytes = 0
        self.sizes: dict[str, int] = {}
        self.epochs = 0
        self.closed = False

    def close(self) -> None:
        with self.space:
            self.closed = True
            self.space.notify_all()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _reserve(self, size: int) -> None:
        deadline = time.monotonic() + STALL_TIMEOUT_S
        with self.space:
            while self.cached_bytes and self.cached_bytes + size > self.limit and not self.closed:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Shard streaming stalled: {self.cached_bytes} B cached, none released for "
                        f"{STALL_TIMEOUT_S} s (cache limit {self.limit} B)"
                    )
                self.space.wait(timeout=1.0)
            self.cached_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.cached_bytes)

    def release(self, path: bytes | str) -> None:
        path = path.decode() if isinstance(path, bytes) else path
        Path(path).unlink(missing_ok=True)
        with self.space:
            self.cached_bytes -= self.sizes.pop(path, 0)
            self.space.notify_all()

    def _fetch(self, index: int, path: str) -> str:
        self.shard_set._download(index, path)
        return path

    def epoch_paths(self, order: Sequence[int]) -> Iterator[str]:
        """Local paths in ``order``, each yielded once its download has finished."""
        epoch = self.epochs
        self.epochs += 1
        pending: collections.deque = collections.deque()
        position = 0
        while position < len(order) or pending:
            # Keep up to 2 x workers downloads in flight, within the cache budget.
            while position < len(order) and len(pending) < 2 * self.shard_set.workers:
                index = order[position]
                size = self.shard_set.shards[index]["bytes"]
                if pending and self.cached_bytes + size > self.limit:
                    break
                self._reserve(size)
                path = str(self.cache_dir / f"e{epoch:04d}-{position:05d}.tfrecord.gz")
                with self.space:
                    self.sizes[path] = size
                pending.append(self.pool.submit(self._fetch, index, path))
                position += 1
            yield pending.popleft().result()

    def dataset(self, *, shuffle: bool, seed: int | None):
        import tensorflow as tf

        count = len(self.shard_set.uris)

        def generate():
            order = list(range(count))
            if shuffle:
                order = list(np.random.default_rng(None if seed is None else seed + self.epochs).permutation(count))
            yield from self.epoch_paths(order)

        return tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec((), tf.string))

    def released_after(self, blocks, path):
        """The file's blocks of records, then a step that deletes the file (it yields nothing).

        The step is joined to blocks, not to records: a concatenation costs every element that
        passes through it, and per record that was 0.3 s of CPU per million (bench_s3_input).
        """
        import tensorflow as tf

        def release(p):
            self.release(p.numpy())
            return tf.zeros([0], tf.string)

        def release_step(p):
            block = tf.py_function(release, [p], tf.string)
            block.set_shape([None])  # like the blocks', so the concatenation keeps their shape
            return block

        done = tf.data.Dataset.from_tensors(path).map(release_step).filter(lambda block: tf.constant(False))
        return blocks.concatenate(done)


@contextlib.contextmanager
def open_shards(manifest_uri: str, split: str, **options) -> Iterator[ShardSet]:
    """``with open_shards(manifest_uri, "train") as shards: raw_batches(shards, ...)``."""
    with ShardSet(manifest_uri, split, **options) as shards:
        yield shards


def raw_batches(shards: ShardSet, batch_size: int):
    """Batches of raw features (a dict of 1-D tensors), in the shards' order.

    Parsing a whole batch with one ``parse_example`` is an order of magnitude faster
    than record by record. The record count from the manifest tells Keras how many
    steps an epoch has.
    """
    import tensorflow as tf

    if not shards.uris:
        raise ValueError(f"No shard files in split {shards.split!r} of {shards.manifest_uri}")
    return (
        shards.record_blocks()
        .rebatch(batch_size)
        .apply(tf.data.experimental.assert_cardinality(-(-shards.records // batch_size)))
        .map(shards.parse, num_parallel_calls=tf.data.AUTOTUNE)
    )


def training_batches(
    shards: ShardSet,
    preprocessor,
    label: str,
    batch_size: int,
    *,
    shuffle_rows: int = 0,
    seed: int | None = None,
    cache: bool = False,
    deterministic: bool = False,
):
    """(preprocessed features, encoded label) batches for ``fit()``, prefetched.

    Records are read, parsed and preprocessed in windows of ``shuffle_rows`` rows
    (rounded up to whole batches): one ``parse_example`` and one preprocessing call
    per window instead of per batch. With ``shuffle_rows``, the file order changes
    every epoch, the readers mix blocks of records from several files (each shard is
    already in a seeded random order, ``tfjobs.shard``), and each window's rows are
    permuted anew every epoch before it is cut into batches; this mixes as well as a
    ``shuffle()`` buffer of the same size without paying for it record by record.
    With ``cache`` the preprocessed windows stay in memory after the first epoch;
    later epochs shuffle all of them, and permute rows across ``REMIX_WINDOWS`` windows
    at a time, so that a batch is not drawn from the same window every epoch.
    ``deterministic``: the same seed gives the same batches (the readers take turns).
    """
    import tensorflow as tf

    if not shards.uris:
        raise ValueError(f"No shard files in split {shards.split!r} of {shards.manifest_uri}")
    window = batch_size * max(1, -(-shuffle_rows // batch_size))

    def parse_and_preprocess(records):
        batch = shards.parse(records)
        target = batch.pop(label)
        # call(), not __call__: under another Keras backend (KERAS_BACKEND=jax), __call__ would
        # convert these graph tensors to that backend's arrays; the preprocessing is TensorFlow.
        return preprocessor.call(batch), preprocessor.encode_label(target)

    dataset = (
        shards.record_blocks(shuffle=bool(shuffle_rows), seed=seed, deterministic=deterministic)
        .rebatch(window)
        .map(parse_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    )
    if cache:
        dataset = dataset.cache()
    if shuffle_rows:
        windows = -(-shards.records // window)
        # Cached windows are in memory already: a buffer of all of them costs references, not copies.
        dataset = dataset.shuffle(windows if cache else min(windows, 16), seed=seed, reshuffle_each_iteration=True)
        if cache:
            dataset = dataset.rebatch(REMIX_WINDOWS * window)
        # One random seed per window, new every epoch, so the permutations run in parallel.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip(dataset, seeds).map(_permute_rows, num_parallel_calls=tf.data.AUTOTUNE)
    if window != batch_size or (cache and shuffle_rows):
        dataset = dataset.rebatch(batch_size)
    if deterministic:
        options = tf.data.Options()
        options.deterministic = True
        dataset = dataset.with_options(options)
    return dataset.apply(tf.data.experimental.assert_cardinality(-(-shards.records // batch_size))).prefetch(
        tf.data.AUTOTUNE
    )


def _permute_rows(window, seed):
    """The window's rows in a random order: one permutation applied to every tensor."""
    import tensorflow as tf

    features, target = window
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(target)[0]), seed=tf.stack([seed, 0]))
    return tf.nest.map_structure(lambda t: tf.gather(t, order), (features, target))
