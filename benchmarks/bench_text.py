"""Text: the input pipeline with TextVectorization against the bare parse ceiling, and SequenceExample sharding.

Synthetic messages (fixed seed): words drawn from a Zipf vocabulary of 20,000, 4 to 40 per
message in sentences of 3 to 12, SMS-like punctuation and case; a ham/spam label.
- input pipeline: Shardline's training pipeline (file shuffling, interleave, windowed row
  shuffling, parsing, then the text kind's cleaning and ``TextVectorization``: standardize,
  split, lookup, pad to ``sequence_length``) reading the shards' first epoch, against
  ``TFRecordDataset -> batch -> parse`` on the same shards; measured in turns, best of three.
  Once for messages stored as Examples, once as SequenceExample documents (whose ceiling
  parses with ``parse_sequence_example`` and joins each document back into its text);
- what one core does: ``TextVectorization`` alone on batches already parsed, which says what
  bounds the pipeline;
- sharding: the shard job's SequenceExample fast path (``tfjobs.storage.sequence_examples``,
  encode + frame + gzip) against building one ``tf.train.SequenceExample`` per row with
  the protobuf classes and ``TFRecordWriter.write`` (GZIP), same rows.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.data import write_validated
from benchmarks.harness import Target, best_of

BATCH = 1024
WINDOW = 8192
WORDS = 20_000


def sms_spec(storage: str):
    from tfjobs.spec import parse_spec

    return parse_spec({
        "name": "sms_synthetic",
        "source": {"kind": "csv", "uri": "synthetic"},
        "label": {"name": "label", "task": "classification", "classes": ["ham", "spam"]},
        "features": {"message": {"kind": "text", "max_tokens": 20_000, "sequence_length": 64,
                                 "storage": storage}},
        "shards": {"train": 8, "eval": 1, "test": 1},
        "na_values": [""],
    })


def messages(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(WORDS)], dtype=object)
    vocabulary[:50] = ["ok", "lar", "free", "Call", "txt", "WIN", "£100", "u", "I", "you", "the", "to", "a", "and",
                       "is", "in", "me", "my", "it", "for", "your", "of", "have", "on", "that", "are", "be", "now",
                       "can", "so", "but", "not", "or", "do", "at", "we", "get", "will", "if", "ur", "just", "no",
                       "with", "this", "gt;", "lt;", "how", "what", "up", "when"]
    counts = rng.integers(4, 41, rows)
    words = vocabulary[np.minimum(rng.zipf(1.3, counts.sum()) - 1, WORDS - 1)]
    ends = rng.choice(np.array([".", "!", "?", "..."], dtype=object), counts.sum())
    sentence_end = rng.random(counts.sum()) < 0.12
    words = np.where(sentence_end, words + ends, words)
    cut = np.cumsum(counts)[:-1]
    texts = [" ".join(row) for row in np.split(words, cut)]
    return pd.DataFrame({"message": texts, "label": rng.choice(["ham", "spam"], rows, p=[0.87, 0.13])})


def _rate(dataset, rows: int) -> float:
    started = time.perf_counter()
    for _ in dataset:
        pass
    return rows / (time.perf_counter() - started)


def _per_row_sequence_examples(frame: pd.DataFrame, path: str) -> None:
    """The usual way: one SequenceExample message per row, sentences split in Python, TFRecordWriter.write."""
    import re

    import tensorflow as tf

    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for text, label in zip(frame["message"].tolist(), frame["label"].tolist()):
            example = tf.train.SequenceExample()
            example.context.feature["label"].bytes_list.value.append(label.encode())
            feature_list = example.feature_lists.feature_list["message"]
            for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
                if sentence:
                    feature_list.feature.add().bytes_list.value.extend(w.encode() for w in sentence.split())
            writer.write(example.SerializeToString())


def run(quick: bool = False) -> list[Target]:
    import tensorflow as tf

    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.features.preprocessing import FeaturePreprocessor
    from tfjobs.shard import framed_records, shard_dataset
    from tfjobs.storage.examples import parse_features
    from tfjobs.storage.input_pipeline import open_shards, training_batches
    from tfjobs.storage.sequence_examples import parse_sequence_examples
    from tfjobs.storage.store import read_json
    from tfjobs.storage.tfrecord import TFRecordFileWriter

    rows = 50_000 if quick else 200_000
    frame = messages(rows)
    targets = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for storage in ("example", "sequence_example"):
            spec = sms_spec(storage)
            validated = write_validated(frame, spec, tmp / storage / "validated")
            manifest = shard_dataset(spec, validated, str(tmp / storage / "shards")).manifest_uri
            state = read_json(adapt_preprocessing(spec, manifest, str(tmp / storage / "prep")).state_uri)
            preprocessor = FeaturePreprocessor(state)
            with open_shards(manifest, "train") as shards:
                train_rows = shards.records
                if storage == "example":
                    features = parse_features(shards.columns)
                    parse = lambda records: tf.io.parse_example(records, features)  # noqa: E731
                else:
                    parse = lambda records: parse_sequence_examples(records, shards.columns)  # noqa: E731
                bare = (tf.data.TFRecordDataset(shards.files, compression_type="GZIP").batch(BATCH)
                        .map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
                _rate(bare, train_rows)  # warm the page cache and TensorFlow
                ceiling = first = 0.0
                for seed in range(3):
                    ceiling = max(ceiling, _rate(bare, train_rows))
                    first = max(first, _rate(training_batches(shards, preprocessor, "label", BATCH,
                                                              shuffle_rows=WINDOW, seed=seed), train_rows))
                if storage == "example":
                    # TextVectorization alone, one batch after another, on batches already parsed in memory.
                    parsed = [batch["message"] for batch in bare]
                    vectorize = tf.function(lambda texts: preprocessor.call({"message": texts})["message"])
                    vectorize(parsed[0])
                    alone = train_rows / best_of(lambda: [vectorize(texts) for texts in parsed])
            name = "Examples" if storage == "example" else "SequenceExample documents"
            targets.append(Target(
                f"text input pipeline, first epoch, messages as {name}", first, ceiling, "rows/s",
                "TFRecordDataset->batch->parse", 0.5,
                note=f"{train_rows:,} messages, TextVectorization (int, 64 tokens) included"
                     + (f"; TextVectorization alone, one core: {alone:,.0f} rows/s" if storage == "example" else ""),
            ))

        # Sharding SequenceExamples: the fast path against one message per row, same rows, GZIP both.
        spec = sms_spec("sequence_example")
        columns = spec.record_columns()
        values = {c.name: frame[c.name].to_numpy(dtype=object) for c in columns}
        per_row = rows // 4

        def fast_path():
            framed = framed_records(columns, values)
            with TFRecordFileWriter(tmp / "fast.tfrecord.gz") as writer:
                for first, stop, data in framed.runs(np.zeros(rows, np.int64)):
                    writer.write_framed(data, stop - first)

        fast = rows / best_of(fast_path)
        usual = per_row / best_of(lambda: _per_row_sequence_examples(frame[:per_row], str(tmp / "usual.tfrecord.gz")))
        read_back = sum(1 for _ in tf.data.TFRecordDataset(str(tmp / "fast.tfrecord.gz"), compression_type="GZIP"))
        assert read_back == rows, (read_back, rows)
        targets.append(Target("shard fast path, SequenceExample documents", fast, usual, "rows/s",
                              "a tf.train.SequenceExample per row + TFRecordWriter", 1.5,
                              note="tokens and sentences cut in NumPy; GZIP both"))
    return targets
