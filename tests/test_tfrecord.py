"""The bulk TFRecord writer: TensorFlow reads back exactly the records written, and the CRCs are right."""

import google_crc32c
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from tfjobs.storage.examples import Column, encode_padded, encode_rows, serialize_examples
from tfjobs.storage.tfrecord import FRAMING, TFRecordFileWriter, frame_in_chunks, record_crc32c

COLUMNS = [Column("x", "float32"), Column("word", "string"), Column("id", "int64"), Column("tag", "string")]


def rows(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=n).astype(np.float32),
        "word": rng.choice(["", "a", "INLAND", "ISLAND", "NEAR OCEAN", "ü" * 90], size=n).astype(object),
        "id": rng.integers(-(2**40), 2**40, size=n),
        "tag": pd.Categorical(rng.choice(["red", "green", "blue"], size=n)),
    }


@pytest.mark.parametrize("compression", ["GZIP", ""])
def test_tensorflow_reads_back_every_record(tmp_path, compression):
    path = tmp_path / "part.tfrecord"
    batches = [rows(1000, seed) for seed in range(3)]
    with TFRecordFileWriter(path, compression) as writer:
        for values in batches:
            writer.write(encode_padded(COLUMNS, values, reserve=FRAMING))
    expected = [r for values in batches for r in serialize_examples(COLUMNS, values)]
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type=compression)]
    assert read == expected  # TensorFlow checks both CRCs of every record as it reads
    assert writer.records == 3000 and writer.bytes == path.stat().st_size
    assert writer.sha256 == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_record_crcs_match_google_crc32c_for_every_layout():
    values = rows(2000, seed=5)
    padded = encode_padded(COLUMNS, values, reserve=FRAMING)
    records = serialize_examples(COLUMNS, values)
    assert len(set(map(len, records))) > 3  # several layouts (string lengths, varint lengths)
    assert record_crc32c(padded).tolist() == [google_crc32c.value(r) for r in records]


def test_identical_rows_and_single_rows():
    for n in (1, 7):
        values = {"x": np.zeros(n, np.float32), "word": np.array(["same"] * n, dtype=object),
                  "id": np.ones(n, np.int64), "tag": pd.Categorical(["red"] * n)}
        padded = encode_padded(COLUMNS, values, reserve=FRAMING)
        assert record_crc32c(padded).tolist() == [google_crc32c.value(r) for r in serialize_examples(COLUMNS, values)]


def test_a_missing_categorical_value_is_an_error_not_a_wrong_record():
    values = {"x": np.zeros(2, np.float32), "word": np.array(["a", "b"], dtype=object), "id": np.ones(2, np.int64),
              "tag": pd.Categorical(["red", None])}
    with pytest.raises(ValueError, match="'tag' has missing values"):
        encode_padded(COLUMNS, values, reserve=FRAMING)


def long_rows(n, seed=0):
    """Short values, long distinct ones of many lengths, and one 16 KiB outlier."""
    rng = np.random.default_rng(seed)
    values = rows(n, seed)
    values["word"] = np.array([f"{i}:" + "é" * int(k) for i, k in enumerate(rng.integers(20, 3000, n))], dtype=object)
    values["tag"] = pd.Categorical(["red"] * (n - 1) + ["x" * 16_384])
    return values


def test_record_crcs_of_long_distinct_values_of_many_lengths():
    values = long_rows(400)
    padded = encode_padded(COLUMNS, values, reserve=FRAMING)
    records = serialize_examples(COLUMNS, values)
    assert len(set(map(len, records))) > 100  # more lengths than stacked shift tables
    assert record_crc32c(padded).tolist() == [google_crc32c.value(r) for r in records]


@pytest.mark.parametrize("budget", [None, 30_000, 1])
def test_records_framed_in_chunks_are_the_same_bytes_whatever_the_budget(tmp_path, budget):
    values = long_rows(400, seed=2)
    order = np.random.default_rng(3).permutation(400)
    framed = frame_in_chunks(encode_rows(COLUMNS, values), order, budget)
    # The outlier is framed apart from the rest (a chunk of its own); a smaller budget cuts the rest.
    assert len(framed.chunks) == 2 if budget is None else len(framed.chunks) > 2
    assert budget != 1 or len(framed.chunks) == 400
    key = np.arange(400) // 100  # runs end where the key changes
    runs = list(framed.runs(key))
    assert all(len(set(key[first:stop])) == 1 for first, stop, _ in runs)
    path = tmp_path / "expected.tfrecord"
    records = serialize_examples(COLUMNS, values)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in order:
            writer.write(records[i])
    assert b"".join(data.tobytes() for _, _, data in runs) == path.read_bytes()


def test_stored_gzip_members_are_gzip_that_zlib_and_tensorflow_read(tmp_path):
    """Members of stored blocks: any write sizes (empty, one block, many, not a block's multiple), back to back."""
    import gzip

    from tfjobs.storage.tfrecord import StoredGzipMember

    rng = np.random.default_rng(3)
    members = [[rng.bytes(n) for n in sizes] for sizes in ([0], [1, 65_535, 65_536], [200_001, 0, 7], [])]
    encoded = b""
    for writes in members:
        member = StoredGzipMember()
        encoded += b"".join(bytes(piece) for data in writes for piece in member.compress(data))
        encoded += b"".join(bytes(piece) for piece in member.flush())
    assert gzip.decompress(encoded) == b"".join(b"".join(writes) for writes in members)
    assert zlib_decompress_members(encoded) == len(members)  # each member ends where the next begins

    path = tmp_path / "stored.tfrecord.gz"
    values = rows(3000)
    with TFRecordFileWriter(path, "GZIP", "stored") as writer:
        writer.write(encode_padded(COLUMNS, values, reserve=FRAMING))
        writer.end_member()
        writer.write(encode_padded(COLUMNS, values, reserve=FRAMING))
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(path), compression_type="GZIP")]
    assert records == serialize_examples(COLUMNS, values) * 2
    assert path.stat().st_size == writer.bytes > sum(map(len, records))  # stored, not deflated


def zlib_decompress_members(data: bytes) -> int:
    import zlib

    count = 0
    while data:
        inflater = zlib.decompressobj(31)
        inflater.decompress(data)
        assert inflater.eof, "a member does not end"
        data, count = inflater.unused_data, count + 1
    return count
