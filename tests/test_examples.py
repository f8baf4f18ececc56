"""The bulk Example encoder must produce exactly what tf.train.Example produces."""

import numpy as np
import pytest
import tensorflow as tf

from tfjobs.storage.examples import Column, parse_features, serialize_examples

COLUMNS = [
    Column("x", "float32"),
    Column("id", "int64"),
    Column("word", "string"),
    Column("a_much_longer_feature_name_" * 3, "string"),
]


def reference_example(row):
    example = tf.train.Example()
    for column in COLUMNS:
        feature = example.features.feature[column.name]
        value = row[column.name]
        if column.dtype == "float32":
            feature.float_list.value.append(value)
        elif column.dtype == "int64":
            feature.int64_list.value.append(int(value))
        else:
            feature.bytes_list.value.append(value.encode())
    return example


@pytest.fixture
def values():
    rng = np.random.default_rng(7)
    n = 300
    out = {
        "x": rng.normal(size=n).astype(np.float32),
        "id": rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64),
        "word": rng.choice(["", "a", "Torgersen", "ünïcødé", "x" * 300], size=n).astype(object),
        COLUMNS[3].name: np.array(["y" * int(k) for k in rng.integers(0, 20_000, n)], dtype=object),
    }
    out["x"][::5] = np.nan
    out["id"][:6] = [0, 1, -1, 127, 128, 2**63 - 1]
    return out


def test_records_equal_tf_train_example_messages(values):
    records = serialize_examples(COLUMNS, values)
    for i in range(len(records)):
        row = {name: column[i] for name, column in values.items()}
        assert tf.train.Example.FromString(records[i]) == reference_example(row), f"row {i}"


def test_records_parse_back_to_the_input_values(values):
    parsed = tf.io.parse_example(tf.constant(serialize_examples(COLUMNS, values)), parse_features(COLUMNS))
    np.testing.assert_array_equal(parsed["x"].numpy(), values["x"])  # NaN == NaN here
    np.testing.assert_array_equal(parsed["id"].numpy(), values["id"])
    assert [v.decode() for v in parsed["word"].numpy()] == list(values["word"])
    assert [len(v) for v in parsed[COLUMNS[3].name].numpy()] == [len(v) for v in values[COLUMNS[3].name]]


def test_columns_must_have_equal_lengths():
    with pytest.raises(ValueError, match="'id' has 2 values, expected 3"):
        serialize_examples(COLUMNS[:2], {"x": np.zeros(3, np.float32), "id": np.zeros(2, np.int64)})


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype 'float64'"):
        Column("x", "float64")


def test_bytes_of_a_few_kib_each_are_written_as_they_are_and_parse_back(tmp_path):
    """Encoded images: binary values, most of them distinct, some over 4 KiB, one empty."""
    from tfjobs.storage.examples import encode_padded
    from tfjobs.storage.tfrecord import FRAMING, STORED, TFRecordFileWriter, gzip_level

    rng = np.random.default_rng(5)
    images = [tf.io.encode_png(rng.integers(0, 256, (int(h), 40, 3), dtype=np.uint8)).numpy()
              for h in rng.integers(1, 40, 200)] + [b"", b"\x00\xff" * 3000]
    columns = [Column("image", "bytes"), Column("label", "string")]
    values = {"image": np.array(images, dtype=object), "label": np.array(["x"] * len(images), dtype=object)}
    assert max(map(len, images)) > 4096
    reference = tf.train.Example()
    reference.features.feature["image"].bytes_list.value.append(images[-1])
    reference.features.feature["label"].bytes_list.value.append(b"x")
    assert tf.train.Example.FromString(serialize_examples(columns, values)[-1]) == reference
    assert gzip_level(columns) == STORED  # encoded files do not compress: the shard job stores them
    with TFRecordFileWriter(tmp_path / "part.tfrecord.gz", "GZIP", STORED) as writer:
        writer.write(encode_padded(columns, values, reserve=FRAMING))
    records = list(tf.data.TFRecordDataset(str(tmp_path / "part.tfrecord.gz"), compression_type="GZIP"))
    parsed = tf.io.parse_example(tf.stack(records), parse_features(columns))
    assert parsed["image"].numpy().tolist() == images  # every byte, CRCs checked by the reader
    assert 1 < writer.bytes / sum(len(r.numpy()) + 16 for r in records) < 1.001  # stored blocks, still GZIP
