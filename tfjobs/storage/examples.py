"""``tf.train.Example`` records for flat rows, serialized in bulk with NumPy.

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

:func:`encode_rows` turns the columns into the pieces every record is made of,
unpadded: the same bytes in every row, a small array per row, or each row's pick
from a table of distinct values (a string column's values are stored once).
:meth:`EncodedRows.padded` then builds any subset of the rows in a padded byte
matrix, one row per record and one block of columns per piece, with a mask of the
bytes that count; ``matrix[mask]`` is then those records back to back, in order.
Fixed-width pieces (floats, keys) need no mask; variable ones (strings, varints)
are padded to the longest value among those rows, so a caller that builds rows a
few at a time bounds the matrix by bytes (``tfjobs.storage.tfrecord.frame_in_chunks``:
one long value does not widen every other row's).
The output parses with ``tf.io.parse_example`` exactly like a message built with
``tf.train.Example`` (the tests check both, byte for byte).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: Storage dtypes, and each one's type in Arrow (validated data) and TensorFlow (records, serving):
#: the one dtype map every step and every feature kind uses.
DTYPES = {
    "float32": {"arrow": "float32", "tensorflow": "float32"},
    "int64": {"arrow": "int64", "tensorflow": "int64"},
    "string": {"arrow": "string", "tensorflow": "string"},
    # Encoded files (an image's PNG or JPEG bytes): binary in Parquet, a BytesList like a string in a record.
    "bytes": {"arrow": "binary", "tensorflow": "string"},
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
    """One value per record: ``float32`` (NaN allowed), ``int64``, ``string`` or ``bytes``.

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
    codes: np.ndarray | None = None  # or row i's bytes are values[codes[i]]: the codes
    values: Sequence[bytes] | None = None  # and the distinct values
    table_lengths: np.ndarray | None = None  # bytes of each value
    table: np.ndarray | None = None  # the values padded (uint8 [values, width]), when few rows each

    @property
    def varies(self) -> bool:
        return self.data is not None or self.codes is not None

    def take(self, rows: np.ndarray | slice | None) -> RecordPiece:
        """This piece for ``rows`` only (all of them, in order, when None)."""
        if rows is None or not self.varies:
            return self
        data = self.data[rows] if isinstance(rows, slice) else _as_void(self.data)[rows].view(np.uint8)
        return RecordPiece(self.width, data=data.reshape(-1, self.width),
                           lengths=None if self.lengths is None else self.lengths[rows])

    def row_lengths(self) -> np.ndarray | int:
        return self.width if self.lengths is None else self.lengths


@dataclass(frozen=True)
class ValuePiece:
    """Row i's bytes are ``values[codes[i]]``: each distinct value stored once, unpadded.

    Padded only when rows are built (:meth:`take`), to the longest value those rows use.
    """

    codes: np.ndarray  # int [rows]
    values: Sequence[bytes]
    value_lengths: np.ndarray  # int64 [values]

    def take(self, rows: np.ndarray | slice | None) -> RecordPiece:
        """The values ``rows`` use, and each row's index among them; as wide as the longest of them."""
        codes = self.codes if rows is None else self.codes[rows]
        used = np.zeros(len(self.values), bool)
        used[codes] = True
        if used.all():
            values = self.values
        else:
            picked = np.flatnonzero(used).tolist()
            values = [self.values[i] for i in picked]
            codes = (np.cumsum(used) - 1)[codes]
        lengths = np.array([len(v) for v in values], np.int64)
        width = int(lengths.max(initial=0))
        table = None
        if len(values) * _ROWS_PER_TABLE_VALUE <= len(codes):  # values repeat: pad them once, then copy by row
            table = np.zeros((len(values), width), np.uint8)
            for row, value in zip(table, values):
                row[: len(value)] = np.frombuffer(value, np.uint8)
        padded = (lengths != width).any()
        return RecordPiece(width, lengths=lengths[codes] if padded else None, codes=codes, values=values,
                           table_lengths=lengths, table=table)

    def row_lengths(self) -> np.ndarray:
        return self.value_lengths[self.codes]


_ROWS_PER_TABLE_VALUE = 4
#: Padded values at least this wide are copied into their rows one by one (measured on encoded images,
#: ``benchmarks/bench_images.py``); narrower ones through one masked scatter of all of them.
ROW_COPY_BYTES = 1024


@dataclass(frozen=True)
class EncodedRows:
    """Every row's serialized Example as the pieces it is made of, unpadded; ``padded`` builds rows from them."""

    pieces: tuple[RecordPiece | ValuePiece, ...]
    lengths: np.ndarray  # int64 [rows]: each record's bytes

    def __len__(self) -> int:
        return len(self.lengths)

    def width(self, rows: np.ndarray | slice | None = None) -> int:
        """How wide the padded matrix of ``rows`` (all, when None) is: each piece as wide as its longest there."""
        width = 0
        for piece in self.pieces:
            if isinstance(piece, ValuePiece):
                codes = piece.codes if rows is None else piece.codes[rows]
                width += int(piece.value_lengths[codes].max(initial=0))
            else:
                width += piece.width
        return width

    def padded(self, rows: np.ndarray | slice | None = None, reserve: tuple[int, int] = (0, 0)) -> PaddedRows:
        """The records of ``rows`` (all, when None), in that order, as padded rows.

        ``reserve`` adds that many always-valid zero bytes before and after each record,
        which a caller can fill in place (TFRecord framing: 12 bytes before, 4 after).
        """
        return _assemble(tuple(piece.take(rows) for piece in self.pieces), reserve)


def encode_rows(columns: Sequence[Column], values: Mapping[str, np.ndarray]) -> EncodedRows:
    """Every row's serialized Example, as pieces (see :class:`EncodedRows`)."""
    if not columns:
        raise ValueError("encode_examples needs at least one column")
    n = len(values[columns[0].name])
    pieces: list[RecordPiece | ValuePiece] = []
    for column in columns:
        column_values = values[column.name]
        if not hasattr(column_values, "codes"):  # a pd.Categorical keeps its codes
            column_values = np.asarray(column_values)
        if len(column_values) != n:
            raise ValueError(f"Column {column.name!r} has {len(column_values)} values, expected {n}")
        pieces.extend(_ENCODERS[column.dtype](column.name.encode(), column_values))
    fixed = sum(p.width for p in pieces if isinstance(p, RecordPiece) and p.lengths is None)
    varying = [p.row_lengths() for p in pieces if not (isinstance(p, RecordPiece) and p.lengths is None)]
    feature_lengths = sum(varying, np.full(n, fixed, np.int64))
    size = _varint_piece(feature_lengths)
    return EncodedRows((RecordPiece(1, b"\x0a"), size, *pieces), 1 + size.row_lengths() + feature_lengths)


def encode_padded(
    columns: Sequence[Column], values: Mapping[str, np.ndarray], reserve: tuple[int, int] = (0, 0)
) -> PaddedRows:
    """Every row's serialized Example as padded rows, assembled in one matrix (see :meth:`EncodedRows.padded`)."""
    return encode_rows(columns, values).padded(reserve=reserve)


def _assemble(body: tuple[RecordPiece, ...], reserve: tuple[int, int]) -> PaddedRows:
    """The padded matrix of records made of ``body``, with ``reserve`` bytes before and after each."""
    n = len(next(p.codes if p.codes is not None else p.data for p in body if p.varies))
    pieces = [RecordPiece(reserve[0], bytes(reserve[0])), *body, RecordPiece(reserve[1], bytes(reserve[1]))]
    width = sum(p.width for p in pieces)
    starts = np.cumsum([0] + [p.width for p in pieces])[:-1].tolist()
    padded = [(start, piece) for start, piece in zip(starts, pieces) if piece.lengths is not None]
    valid = None
    lengths = np.full(n, width, np.int64)
    if padded:
        valid = np.empty((n, width), bool)
        valid[:] = True
        for field, (start, piece) in zip(_fields(valid, padded), padded):
            if piece.width < n:  # a mask per length, picked by each row's length
                masks = np.arange(piece.width + 1)[:, None] > np.arange(piece.width)
                field[:] = _as_void(masks.view(np.uint8))[piece.lengths]
            else:  # few rows, long values: fewer masks than lengths
                valid[:, start : start + piece.width] = np.arange(piece.width) < piece.lengths[:, None]
            lengths -= piece.width - piece.lengths
    template = np.zeros(width, np.uint8)
    for start, piece in zip(starts, pieces):
        if piece.constant:
            template[start : start + piece.width] = np.frombuffer(piece.constant, np.uint8)
    data = np.empty((n, width), np.uint8)
    data[:] = template
    # Per-row pieces are copied as one opaque field per row (a structured view), not byte by byte.
    varying = [(start, piece) for start, piece in zip(starts, pieces) if piece.varies and piece.width]
    for field, (start, piece) in zip(_fields(data, varying), varying):
        if piece.data is not None:
            field[:] = _as_void(piece.data)
        elif piece.table is not None:
            field[:] = _as_void(piece.table)[piece.codes]
        else:  # values mostly distinct (long strings, encoded files)
            columns = data[:, start : start + piece.width]
            if piece.lengths is None:
                columns[:] = np.frombuffer(b"".join([piece.values[c] for c in piece.codes.tolist()]),
                                           np.uint8).reshape(n, piece.width)
            elif piece.width >= ROW_COPY_BYTES:  # each value into its row: a copy per row beats a masked scatter
                for row, code in zip(columns, piece.codes.tolist()):
                    value = piece.values[code]
                    row[: len(value)] = np.frombuffer(value, np.uint8)
            else:  # joined, then into the bytes of the rows that are theirs
                joined = np.frombuffer(b"".join([piece.values[c] for c in piece.codes.tolist()]), np.uint8)
                columns[valid[:, start : start + piece.width]] = joined
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


@functools.lru_cache(maxsize=4096)
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


def _encode_int64(key: bytes, values: np.ndarray) -> list[RecordPiece | ValuePiece]:
    varints = _varint_piece(np.asarray(values, np.int64).view(np.uint64))
    # The prefix depends on the varint's length (1..10 bytes); all prefixes have the same width.
    prefixes = [_entry_prefix(key, 0x1A, n) for n in range(1, 11)]
    codes = np.broadcast_to(varints.row_lengths(), (len(values),)) - 1
    return [ValuePiece(codes, prefixes, np.array([len(p) for p in prefixes], np.int64)), varints]


#: Mean length (bytes) above which a string column's values are taken as distinct, one per row, not
#: factorized: hashing long values to find the few repeated ones costs more than it saves.
DISTINCT_VALUE_BYTES = 256


def _encode_string(key: bytes, values) -> list[ValuePiece]:
    """Each distinct value is encoded once; rows pick theirs by index (a ``pd.Categorical``'s codes if given)."""
    import pandas as pd

    if isinstance(values, pd.Categorical):
        inverse, uniques = values.codes, values.categories
        if (inverse < 0).any():
            raise ValueError(f"Column {key.decode()!r} has missing values: a string feature needs a value in every row")
    else:
        values = np.asarray(values).astype(object)
        if len(values) and sum(map(len, map(_utf8, values))) >= DISTINCT_VALUE_BYTES * len(values):
            return [_value_piece(key, np.arange(len(values)), list(map(_utf8, values)))]
        inverse, uniques = pd.factorize(values, use_na_sentinel=False)
    return [_value_piece(key, inverse, list(map(_utf8, uniques)))]


def _utf8(value) -> bytes:
    """A value's bytes: a ``str`` as UTF-8, ``bytes`` as they are (an encoded image; a string column read from
    Arrow as binary)."""
    return value if type(value) is bytes else str(value).encode()


def _value_piece(key: bytes, codes: np.ndarray, encoded: list[bytes]) -> ValuePiece:
    segments = [_entry_prefix(key, 0x0A, len(e)) + e for e in encoded]
    return ValuePiece(codes, segments, np.array([len(s) for s in segments], np.int64))


_ENCODERS = {"float32": _encode_float32, "int64": _encode_int64, "string": _encode_string, "bytes": _encode_string}
