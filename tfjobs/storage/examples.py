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

Rows are built in a padded byte matrix, one row per record and one block of
columns per feature, with a mask of the bytes that count; ``matrix[mask]`` is
then every record back to back, in order. Fixed-width pieces (floats, keys) need
no mask; variable ones (strings, varints) are padded to their longest value.
The output parses with ``tf.io.parse_example`` exactly like a message built with
``tf.train.Example`` (the tests check both, byte for byte).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Storage dtypes, and each one's type in Arrow (validated data) and TensorFlow (records, serving):
#: the one dtype map every step and every feature kind uses.
DTYPES = {
    "float32": {"arrow": "float32", "tensorflow": "float32"},
    "int64": {"arrow": "int64", "tensorflow": "int64"},
    "string": {"arrow": "string", "tensorflow": "string"},
}


def tf_dtype(dtype: str):
    """The TensorFlow dtype of a storage dtype."""
    import tensorflow as tf

    return tf.dtypes.as_dtype(DTYPES[dtype]["tensorflow"])


def arrow_type(dtype: str):
    """The Arrow type of a storage dtype."""
    import pyarrow as pa

    return pa.type_for_alias(DTYPES[dtype]["arrow"])


@dataclass(frozen=True)
class Column:
    """One value per record: ``float32`` (NaN allowed), ``int64`` or ``string``.

    ``document``: a string stored as a document, sentences of tokens in a feature list of a
    ``tf.train.SequenceExample`` (:mod:`tfjobs.storage.sequence_examples`), not as one value.
    """

    name: str
    dtype: str
    document: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"Column {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.document and self.dtype != "string":
            raise ValueError(f"Column {self.name!r}: only a string can be stored as a document, not {self.dtype}")
        if len(self.name.encode()) > 100:
            raise ValueError(f"Column name {self.name!r} is longer than 100 bytes")


def serialize_examples(columns: Sequence[Column], values: Mapping[str, np.ndarray]) -> list[bytes]:
    """One serialized ``tf.train.Example`` per row."""
    rows = encode_padded(columns, values)
    ends = np.cumsum(rows.lengths)
    buffer = rows.compact().tobytes()
    return [buffer[e - n : e] for e, n in zip(ends.tolist(), rows.lengths.tolist())]


def encode_examples(columns: Sequence[Column], values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All rows' serialized Examples, back to back: (bytes as uint8, length of each row)."""
    rows = encode_padded(columns, values)
    return rows.compact(), rows.lengths


def parse_features(columns: Sequence[Column]) -> dict:
    """The ``tf.io.parse_example`` feature spec for ``columns``."""
    import tensorflow as tf

    return {c.name: tf.io.FixedLenFeature([], tf_dtype(c.dtype)) for c in columns}


@dataclass(frozen=True)
class PaddedRows:
    """Variable-length byte rows: row i is ``data[i][valid[i]]`` (all of ``data[i]`` when valid is None).

    ``body`` lists the pieces every record is made of, in order (the TFRecord framing
    a caller reserved excluded): each piece is the same bytes in every row, or a column
    of per-row bytes, possibly padded, possibly rows of a table of distinct values.
    That is what the TFRecord writer's CRC works from.
    """

    data: np.ndarray  # uint8 [rows, width]
    valid: np.ndarray | None  # bool [rows, width]
    lengths: np.ndarray  # int64 [rows]: valid bytes per row
    body: tuple[RecordPiece, ...]

    def compact(self) -> np.ndarray:
        """Every row's bytes back to back, in row order."""
        return self.data.ravel() if self.valid is None else self.data[self.valid]


@dataclass(frozen=True)
class RecordPiece:
    """One piece of every record, at the same columns of every padded row."""

    width: int
    constant: bytes = b""  # the bytes, when they are the same in every row
    data: np.ndarray | None = None  # uint8 [rows, width], when they are not
    lengths: np.ndarray | None = None  # bytes used per row, when rows are padded
    codes: np.ndarray | None = None  # or row i's bytes are table[codes[i]]: the codes
    table: np.ndarray | None = None  # and the table of distinct values (uint8 [values, width])
    table_lengths: np.ndarray | None = None  # bytes used per table row

    @property
    def varies(self) -> bool:
        return self.data is not None or self.codes is not None


def encode_padded(
    columns: Sequence[Column], values: Mapping[str, np.ndarray], reserve: tuple[int, int] = (0, 0)
) -> PaddedRows:
    """Every row's serialized Example as padded rows, assembled in one matrix.

    ``reserve`` adds that many always-valid zero bytes before and after each record,
    which a caller can fill in place (TFRecord framing: 12 bytes before, 4 after).
    """
    if not columns:
        raise ValueError("encode_examples needs at least one column")
    n = len(values[columns[0].name])
    pieces: list[RecordPiece] = []
    for column in columns:
        column_values = values[column.name]
        if not hasattr(column_values, "codes"):  # a pd.Categorical keeps its codes
            column_values = np.asarray(column_values)
        if len(column_values) != n:
            raise ValueError(f"Column {column.name!r} has {len(column_values)} values, expected {n}")
        pieces.extend(_ENCODERS[column.dtype](column.name.encode(), column_values))
    fixed = sum(p.width for p in pieces if p.lengths is None)
    feature_lengths = sum((p.lengths for p in pieces if p.lengths is not None), np.full(n, fixed, np.int64))
    body = (RecordPiece(1, b"\x0a"), _varint_piece(feature_lengths), *pieces)
    pieces = [RecordPiece(reserve[0], bytes(reserve[0])), *body, RecordPiece(reserve[1], bytes(reserve[1]))]

    width = sum(p.width for p in pieces)
    template = np.zeros(width, np.uint8)
    starts = np.cumsum([0] + [p.width for p in pieces])[:-1].tolist()
    for start, piece in zip(starts, pieces):
        if piece.constant:
            template[start : start + piece.width] = np.frombuffer(piece.constant, np.uint8)
    data = np.empty((n, width), np.uint8)
    data[:] = template
    # Per-row pieces are copied as one opaque field per row (a structured view), not byte by byte.
    varying = [(start, piece) for start, piece in zip(starts, pieces) if piece.varies]
    for field, (_, piece) in zip(_fields(data, varying), varying):
        field[:] = _as_void(piece.table)[piece.codes] if piece.codes is not None else _as_void(piece.data)
    padded = [(start, piece) for start, piece in zip(starts, pieces) if piece.lengths is not None]
    valid = None
    lengths = np.full(n, width, np.int64)
    if padded:
        valid = np.empty((n, width), bool)
        valid[:] = True
        for field, (_, piece) in zip(_fields(valid, padded), padded):
            # A padded piece's valid bytes, by row: a mask per length, picked by each row's length.
            masks = np.arange(piece.width + 1)[:, None] > np.arange(piece.width)
            field[:] = _as_void(masks.view(np.uint8))[piece.lengths]
            lengths -= piece.width - piece.lengths
    return PaddedRows(data, valid, lengths, body)


def _fields(matrix: np.ndarray, pieces: list[tuple[int, RecordPiece]]) -> list[np.ndarray]:
    """For each (start column, piece): its columns of ``matrix`` as one opaque value per row."""
    rows = matrix.view(np.uint8).view(np.dtype({
        "names": [f"p{i}" for i in range(len(pieces))], "formats": [f"V{piece.width}" for _, piece in pieces],
        "offsets": [start for start, _ in pieces], "itemsize": matrix.shape[1]})).reshape(len(matrix))
    return [rows[f"p{i}"] for i in range(len(pieces))]


def _as_void(matrix: np.ndarray) -> np.ndarray:
    """uint8 [rows, width] as one opaque ``V<width>`` value per row."""
    return np.ascontiguousarray(matrix).view(f"V{matrix.shape[1]}").reshape(len(matrix))


def _varint_piece(values: np.ndarray) -> RecordPiece:
    """Protobuf base-128 varints of uint64 values, one per row, padded to the longest."""
    values = values.astype(np.uint64)
    width = max(1, (int(values.max(initial=0)).bit_length() + 6) // 7)  # of the longest
    lengths = np.ones(len(values), np.int64)
    for i in range(1, width):
        lengths += values >= np.uint64(1 << (7 * i))
    groups = np.empty((len(values), width), np.uint8)
    remaining = values.copy()
    for i in range(width):
        groups[:, i] = (remaining & np.uint64(0x7F)).astype(np.uint8)
        remaining >>= np.uint64(7)
    groups |= ((np.arange(width) < (lengths[:, None] - 1)) * 0x80).astype(np.uint8)
    return RecordPiece(width, data=groups, lengths=None if (lengths == width).all() else lengths)


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


def _encode_float32(key: bytes, values: np.ndarray) -> list[RecordPiece]:
    prefix = _entry_prefix(key, 0x12, 4)
    floats = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
    return [RecordPiece(len(prefix), prefix), RecordPiece(4, data=floats)]


def _encode_int64(key: bytes, values: np.ndarray) -> list[RecordPiece]:
    varints = _varint_piece(np.asarray(values, np.int64).view(np.uint64))
    lengths = varints.width if varints.lengths is None else varints.lengths
    # The prefix depends on the varint's length (1..10 bytes); all prefixes have the same width.
    table = np.stack([np.frombuffer(_entry_prefix(key, 0x1A, n), np.uint8) for n in range(1, 11)])
    codes = np.broadcast_to(lengths, (len(values),)) - 1
    return [RecordPiece(table.shape[1], codes=codes, table=table), varints]


def _encode_string(key: bytes, values) -> list[RecordPiece]:
    """Each distinct value is encoded once; rows pick theirs by index (a ``pd.Categorical``'s codes if given)."""
    import pandas as pd

    if isinstance(values, pd.Categorical):
        inverse, uniques = values.codes, values.categories
        if (inverse < 0).any():
            raise ValueError(f"Column {key.decode()!r} has missing values: a string feature needs a value in every row")
    else:
        inverse, uniques = pd.factorize(np.asarray(values).astype(object), use_na_sentinel=False)
    segments = [_entry_prefix(key, 0x0A, len(e)) + e for e in (str(u).encode() for u in uniques)]
    lengths = np.array([len(s) for s in segments], np.int64)
    table = np.zeros((len(segments), int(lengths.max(initial=0))), np.uint8)
    for i, segment in enumerate(segments):
        table[i, : len(segment)] = np.frombuffer(segment, np.uint8)
    padded = (lengths != table.shape[1]).any()
    return [RecordPiece(table.shape[1], lengths=lengths[inverse] if padded else None,
                        codes=inverse, table=table, table_lengths=lengths)]


_ENCODERS = {"float32": _encode_float32, "int64": _encode_int64, "string": _encode_string}
