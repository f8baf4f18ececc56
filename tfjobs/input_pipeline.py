"""tf.data input pipelines over TFRecord shards.

``raw_batches`` yields batches of raw feature values (the same dtypes as the
serving signature); ``training_batches`` turns them into what the training model
eats: preprocessed features and an encoded label.

Shards are read concurrently (``interleave``), records are parsed a batch at a
time (``parse_example`` on a batch is an order of magnitude faster than one record
at a time), and everything is prefetched so the model never waits on input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from tfjobs.examples import Column, parse_features
from tfjobs.shard import COMPRESSION, shard_uris
from tfjobs.store import local_dir_copy, read_json, store_for

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module import


def manifest_columns(manifest: dict) -> list[Column]:
    return [Column(c["name"], c["dtype"]) for c in manifest["columns"]]


@contextlib.contextmanager
def local_shards(manifest_uri: str, split: str) -> Iterator[list[str]]:
    """Local paths of one split's shards for the duration of the block."""
    uris = shard_uris(manifest_uri, split)
    store = store_for(manifest_uri)
    if store.local_path(manifest_uri) is not None:
        yield [str(store.local_path(u)) for u in uris]
        return
    base = manifest_uri.rsplit("/", 1)[0]
    with local_dir_copy(f"{base}/{split}") as directory:
        yield [str(Path(directory) / u.rsplit("/", 1)[1]) for u in uris]


def raw_batches(
    files: Sequence[str],
    columns: Sequence[Column],
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    seed: int | None = None,
    cache: bool = False,
    records: int | None = None,
):
    """Batches of raw features, a dict of 1-D tensors per batch.

    With ``shuffle_buffer`` the file order and the records are shuffled anew each
    epoch; without it the order is the shards' order, deterministically. ``cache``
    keeps the decompressed records in memory after the first epoch. ``records``
    (from the manifest) tells Keras how many steps an epoch has.
    """
    import tensorflow as tf

    files = list(files)
    if not files:
        raise ValueError("No shard files to read")
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_buffer:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=COMPRESSION),
        cycle_length=min(len(files), 8),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle_buffer,
    )
    if cache:
        dataset = dataset.cache()
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if records is not None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(-(-records // batch_size)))
    features = parse_features(columns)
    return dataset.map(lambda batch: tf.io.parse_example(batch, features), num_parallel_calls=tf.data.AUTOTUNE)


def training_batches(raw, preprocessor, label: str):
    """(preprocessed features, encoded label) batches from ``raw_batches``, prefetched."""
    import tensorflow as tf

    def split_label(batch):
        batch = dict(batch)
        target = batch.pop(label)
        return preprocessor(batch), preprocessor.encode_label(target)

    return raw.map(split_label, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def split_records(manifest_uri: str, split: str) -> int:
    return read_json(manifest_uri)["splits"][split]["records"]
