"""``tf.train.Example`` records for flat tabular rows, serialized in bulk with NumPy.

Building one ``tf.train.Example`` message per row, as tutorials do, costs a few
microseconds of Python per value. A tabular shard has one value per feature, so
every record has the same shape and only the values change; this module writes
the protobuf wire format for a whole column at a time:

    Example  = 0x0A len Features
    Features = (0x0A len MapEntry)*             one entry per column
    MapEntry = 0x0A len key 0x12 len Feature
    Feature  = 0x12 len FloatList | 0x1A len Int64List | 0x0A len BytesList
    FloatList = 0x0A 0x04 <float32 LE>          (packed, one value)
    Int64List = 0x0A len <varint>               (packed, one value)
    BytesList = 0x0A len <bytes>

The output parses with ``tf.io.parse_example`` exactly like a message built with
``tf.train.Example`` (the tests check both, value for value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DTYPES = ("float32", "int64", "string")


@dataclass(frozen=True)
class Column:
    """One value per record: ``float32`` (NaN allowed), ``int64`` or ``string``."""

    name: str
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"Column {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        if len(self.name.encode()) > 100:
            raise ValueError(f"Column name {self.name!r} is longer than 100 bytes")


def spec_columns(spec) -> list[Column]:
    """The columns a pipeline spec's shards hold: the features, then the label."""
    return [Column(f.name, f.dtype) for f in spec.features] + [Column(spec.label.name, spec.label.dtype)]


def serialize_examples(columns: Sequence[Column], values: Mapping[str, np.ndarray]) -> list[bytes]:
    """One serialized ``tf.train.Example`` per row."""
    data, lengths = encode_examples(columns, values)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    buffer = data.tobytes()
    return [buffer[s:e] for s, e in zip(starts.tolist(), ends.tolist())]


def encode_examples(columns: Sequence[Column], values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All rows' serialized Examples, back to back: (bytes as uint8, length of each row)."""
    if not columns:
        raise ValueError("encode_examples needs at least one column")
    n = len(values[columns[0].name])
    parts = []
    for column in columns:
        column_values = np.asarray(values[column.name])
        if len(column_values) != n:
            raise ValueError(f"Column {column.name!r} has {len(column_values)} values, expected {n}")
        parts.append(_ENCODERS[column.dtype](column.name.encode(), column_values))
    features = concat_rows(parts)
    return concat_rows([_length_delimited(0x0A, features[1]), features])


def parse_features(columns: Sequence[Column]) -> dict:
    """The ``tf.io.parse_example`` feature spec for ``columns``."""
    import tensorflow as tf

    dtypes = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}
    return {c.name: tf.io.FixedLenFeature([], dtypes[c.dtype]) for c in columns}


# Segments are (data, lengths): the bytes of every row's piece back to back, and
# each piece's length. Fixed-width pieces are (matrix of shape [rows, width], None).


def concat_rows(parts: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate each row's pieces across ``parts``: row i = parts[0][i] + parts[1][i] + ..."""
    n = _rows(parts[0])
    lengths = [np.full(n, p[0].shape[1], np.int64) if p[1] is None else p[1].astype(np.int64) for p in parts]
    row_lengths = np.sum(lengths, axis=0)
    out = np.empty(int(row_lengths.sum()), np.uint8)
    offset = np.cumsum(row_lengths) - row_lengths  # where each row starts
    for (data, _), piece_lengths in zip(parts, lengths):
        if data.ndim == 2:  # fixed width: one index row per record
            width = data.shape[1]
            out[(offset[:, None] + np.arange(width)).ravel()] = data.ravel()
        else:
            piece_starts = np.cumsum(piece_lengths) - piece_lengths
            out[np.repeat(offset - piece_starts, piece_lengths) + np.arange(len(data))] = data
        offset = offset + piece_lengths
    return out, row_lengths


def _rows(part) -> int:
    return part[0].shape[0] if part[1] is None else len(part[1])


def _varint(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf base-128 varints of uint64 values: (bytes back to back, length of each)."""
    values = values.astype(np.uint64)
    groups = np.empty((len(values), 10), np.uint8)
    remaining = values.copy()
    for i in range(10):
        groups[:, i] = (remaining & np.uint64(0x7F)).astype(np.uint8)
        remaining >>= np.uint64(7)
    lengths = np.ones(len(values), np.int64)
    for i in range(1, 10):
        lengths += (values >> np.uint64(7 * i)) > 0
    keep = np.arange(10) < lengths[:, None]
    continuation = np.arange(10) < (lengths[:, None] - 1)
    groups |= (continuation * 0x80).astype(np.uint8)
    return groups[keep], lengths


def _length_delimited(tag: int, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``tag varint(length)`` for each row: the header of a length-delimited field."""
    data, varint_lengths = _varint(lengths)
    tags = np.full(len(lengths), tag, np.uint8)
    return concat_rows([(tags[:, None], None), (data, varint_lengths)])


def _entry_prefix(key: bytes, feature_tag: int, payload_length: int) -> bytes:
    """A map entry's bytes up to its one value, for a value of ``payload_length`` bytes."""
    list_length = 1 + len(_varint_bytes(payload_length)) + payload_length
    feature_length = 1 + len(_varint_bytes(list_length)) + list_length
    entry_length = 2 + len(key) + 1 + len(_varint_bytes(feature_length)) + feature_length
    return b"".join([
        b"\x0a", _varint_bytes(entry_length),
        b"\x0a", _varint_bytes(len(key)), key,
        b"\x12", _varint_bytes(feature_length),
        bytes([feature_tag]), _varint_bytes(list_length),
        b"\x0a", _varint_bytes(payload_length),
    ])


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_float32(key: bytes, values: np.ndarray):
    prefix = np.frombuffer(_entry_prefix(key, 0x12, 4), np.uint8)
    floats = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
    matrix = np.empty((len(values), len(prefix) + 4), np.uint8)
    matrix[:, : len(prefix)] = prefix
    matrix[:, len(prefix) :] = floats
    return matrix, None


def _encode_int64(key: bytes, values: np.ndarray):
    data, lengths = _varint(np.asarray(values, np.int64).view(np.uint64))
    # The prefix depends on the varint's length (1..10 bytes); all prefixes have the same width.
    table = np.stack(
        [np.frombuffer(_entry_prefix(key, 0x1A, n), np.uint8) for n in range(1, 11)]
    )
    return concat_rows([(table[lengths - 1], None), (data, lengths)])


def _encode_string(key: bytes, values: np.ndarray):
    uniques, inverse = np.unique(values.astype(object).astype(str), return_inverse=True)
    encoded = [u.encode() for u in uniques]
    segments = np.array([_entry_prefix(key, 0x0A, len(e)) + e for e in encoded] or [b""], dtype=object)
    lengths = np.array([len(s) for s in segments], np.int64)[inverse]
    data = np.frombuffer(b"".join(segments[inverse].tolist()), np.uint8)
    return data, lengths


_ENCODERS = {"float32": _encode_float32, "int64": _encode_int64, "string": _encode_string}
