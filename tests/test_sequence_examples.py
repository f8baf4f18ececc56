"""The bulk SequenceExample encoder must produce what tf.train.SequenceExample produces, framed as TFRecord."""

import numpy as np
import pytest
import tensorflow as tf

from tfjobs.storage.examples import Column
from tfjobs.storage.sequence_examples import (
    encode_framed_sequence_examples,
    encode_sequence_examples,
    parse_sequence_examples,
    record_format,
)

COLUMNS = [
    Column("x", "float32"),
    Column("message", "string", document=True),
    Column("label", "string"),
    Column("subject", "string", document=True),
]
TEXTS = [
    "Ok lar... Joking wif u oni...",
    "",
    " \t ",
    "Free £100! Call\tnow?yes ok.",
    "a",
    "end.  ",
    "ünï  cødé\x0bx\x0cy\r\nz",  # every ASCII whitespace cuts; other bytes do not
    "x" * 300 + " y?!",
    "no\u00a0break\u2003space",  # Unicode spaces are not ASCII whitespace: one token
]


def reference(row: dict) -> tf.train.SequenceExample:
    """What the encoder must write, built message by message with the protobuf classes."""
    example = tf.train.SequenceExample()
    example.context.feature["x"].float_list.value.append(row["x"])
    example.context.feature["label"].bytes_list.value.append(row["label"].encode())
    for name in ("message", "subject"):
        feature_list = example.feature_lists.feature_list[name]
        sentence = []
        for token in row[name].encode().split():  # bytes.split(): ASCII whitespace, as tf.strings.split
            sentence.append(token)
            if token[-1:] in (b".", b"!", b"?"):
                feature_list.feature.add().bytes_list.value.extend(sentence)
                sentence = []
        if sentence:
            feature_list.feature.add().bytes_list.value.extend(sentence)
    return example


@pytest.fixture
def values():
    rng = np.random.default_rng(3)
    n = 200
    return {
        "x": rng.normal(size=n).astype(np.float32),
        "message": np.array(rng.choice(TEXTS, n), dtype=object),
        "label": np.array(rng.choice(["ham", "spam"], n), dtype=object),
        "subject": np.array(rng.choice(TEXTS[::-1], n), dtype=object),
    }


def test_records_equal_tf_train_sequence_example_messages(values):
    records = encode_sequence_examples(COLUMNS, values).tolist()
    for i, record in enumerate(records):
        row = {name: column[i] for name, column in values.items()}
        assert tf.train.SequenceExample.FromString(record) == reference(row), f"row {i}: {row}"


def test_framed_records_read_back_with_tensorflows_reader(values, tmp_path):
    data, lengths = encode_framed_sequence_examples(COLUMNS, values)
    (tmp_path / "part.tfrecord").write_bytes(data.tobytes())
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "part.tfrecord"))]
    assert read == encode_sequence_examples(COLUMNS, values).tolist()
    assert lengths.tolist() == [len(r) + 16 for r in read]  # length, its CRC, the record, its CRC


def test_documents_parse_into_ragged_sentences_and_read_back_as_their_text(values):
    records = tf.constant(encode_sequence_examples(COLUMNS, values).tolist())
    _, documents, _ = tf.io.parse_sequence_example(
        records, context_features={"label": tf.io.FixedLenFeature([], tf.string)},
        sequence_features={"message": tf.io.RaggedFeature(tf.string, row_splits_dtype=tf.int64)})
    assert documents["message"].shape.rank == 3  # [rows, sentences, tokens]
    first = values["message"].tolist().index(TEXTS[0])
    assert documents["message"][first].to_list() == [[b"Ok", b"lar..."], [b"Joking", b"wif", b"u", b"oni..."]]
    parsed = parse_sequence_examples(records, COLUMNS)
    assert list(parsed) == [c.name for c in COLUMNS]
    np.testing.assert_array_equal(parsed["x"].numpy(), values["x"])
    # A document reads back as its tokens joined by single spaces: whitespace runs collapse, nothing else changes.
    for name in ("message", "subject"):
        expected = [b" ".join(text.encode().split()).decode() for text in values[name]]
        assert [text.decode() for text in parsed[name].numpy()] == expected


def test_the_record_format_follows_the_columns():
    assert record_format(COLUMNS) == "sequence_example"
    assert record_format([Column("x", "float32"), Column("label", "string")]) == "example"
    with pytest.raises(ValueError, match="only a string can be stored as a document"):
        Column("x", "float32", document=True)
    with pytest.raises(ValueError, match="needs a column stored as a document and one that is not"):
        encode_sequence_examples([COLUMNS[1]], {"message": np.array(["a"], dtype=object)})
