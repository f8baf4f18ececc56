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

    dtypes = {"float32": tf.float32, "int64": tf.int64, "string": tf.string}
    return {c.name: tf.io.FixedLenFeature([], dtypes[c.dtype]) for c in columns}


@dataclass(frozen=True)
class PaddedRows:
    """Variable-length byte rows: row i is ``data[i][valid[i]]`` (all of ``data[i]`` when valid is None).

    ``layout`` numbers the rows' layouts (rows with the same number have the same valid
    columns; None: one layout) and ``value_columns`` lists the columns whose bytes can
    differ between rows (everything else is the same in every row): what the TFRecord
    writer's CRC needs to know.
    """

    data: np.ndarray  # uint8 [rows, width]
    valid: np.ndarray | None  # bool [rows, width]
    lengths: np.ndarray  # int64 [rows]: valid bytes per row
    layout: np.ndarray | None = None
    value_columns: np.ndarray | None = None
    # Columns [start, start + width) that hold, in row i, row codes[i] of a table of distinct values.
    categorical: tuple[CategoricalColumns, ...] = ()

    def compact(self) -> np.ndarray:
        """Every row's bytes back to back, in row order."""
        return self.data.ravel() if self.valid is None else self.data[self.valid]

    def rows(self, start: int, stop: int) -> PaddedRows:
        """Rows ``start:stop``, as views (no copy)."""
        def cut(array):
            return None if array is None else array[start:stop]

        return PaddedRows(
            self.data[start:stop], cut(self.valid), self.lengths[start:stop], cut(self.layout), self.value_columns,
            tuple(c.rows(start, stop) for c in self.categorical),
        )


@dataclass(frozen=True)
class CategoricalColumns:
    """A block of columns whose bytes in each row are one row of ``table``: ``table[codes]``."""

    start: int
    codes: np.ndarray  # [rows]
    table: np.ndarray  # uint8 [distinct values, width]

    def rows(self, start: int, stop: int) -> CategoricalColumns:
        return CategoricalColumns(self.start, self.codes[start:stop], self.table)


@dataclass(frozen=True)
class _Block:
    """One piece of every record, at the same columns in every row."""

    width: int
    constant: bytes = b""  # the bytes, when they are the same in every row
    data: np.ndarray | None = None  # uint8 [rows, width], when they are not
    lengths: np.ndarray | None = None  # bytes used per row, when rows are padded
    codes: np.ndarray | None = None  # when data is table[codes]: the codes
    table: np.ndarray | None = None  # and the table


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
    blocks: list[_Block] = []
    for column in columns:
        column_values = values[column.name]
        if not hasattr(column_values, "codes"):  # a pd.Categorical keeps its codes
            column_values = np.asarray(column_values)
        if len(column_values) != n:
            raise ValueError(f"Column {column.name!r} has {len(column_values)} values, expected {n}")
        blocks.extend(_ENCODERS[column.dtype](column.name.encode(), column_values))
    feature_lengths = sum(b.width if b.lengths is None else b.lengths for b in blocks) * np.ones(n, np.int64)
    header = _varint_block(feature_lengths)
    blocks = [_Block(reserve[0], bytes(reserve[0])), _Block(1, b"\x0a"), header, *blocks,
              _Block(reserve[1], bytes(reserve[1]))]

    width = sum(b.width for b in blocks)
    template = np.zeros(width, np.uint8)
    starts = np.cumsum([0] + [b.width for b in blocks])[:-1]
    for start, block in zip(starts, blocks):
        if block.data is None:
            template[start : start + block.width] = np.frombuffer(block.constant, np.uint8)
    data = np.empty((n, width), np.uint8)
    data[:] = template
    padded = [(start, block) for start, block in zip(starts, blocks) if block.lengths is not None]
    valid = np.ones((n, width), bool) if padded else None
    lengths = np.full(n, width, np.int64)
    layout = np.zeros(n, np.int64) if padded else None
    value_columns, categorical = [], []
    for start, block in zip(starts, blocks):
        if block.data is not None:
            data[:, start : start + block.width] = block.data
            if block.codes is not None:
                categorical.append(CategoricalColumns(int(start), block.codes, block.table))
            else:
                value_columns.append(np.arange(start, start + block.width))
    for start, block in padded:
        valid[:, start : start + block.width] = np.arange(block.width) < block.lengths[:, None]
        lengths -= block.width - block.lengths
        layout = layout * (block.width + 1) + block.lengths
    value_columns = np.concatenate(value_columns) if value_columns else np.array([], np.int64)
    return PaddedRows(data, valid, lengths, layout, value_columns, tuple(categorical))


def _varint_block(values: np.ndarray) -> _Block:
    """Protobuf base-128 varints of uint64 values, one per row, padded to the longest."""
    values = values.astype(np.uint64)
    lengths = np.ones(len(values), np.int64)
    for i in range(1, 10):
        lengths += (values >> np.uint64(7 * i)) > 0
    width = int(lengths.max(initial=1))
    groups = np.empty((len(values), width), np.uint8)
    remaining = values.copy()
    for i in range(width):
        groups[:, i] = (remaining & np.uint64(0x7F)).astype(np.uint8)
        remaining >>= np.uint64(7)
    groups |= ((np.arange(width) < (lengths[:, None] - 1)) * 0x80).astype(np.uint8)
    return _Block(width, data=groups, lengths=None if (lengths == width).all() else lengths)


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


def _encode_float32(key: bytes, values: np.ndarray) -> list[_Block]:
    prefix = _entry_prefix(key, 0x12, 4)
    floats = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
    return [_Block(len(prefix), prefix), _Block(4, data=floats)]


def _encode_int64(key: bytes, values: np.ndarray) -> list[_Block]:
    varints = _varint_block(np.asarray(values, np.int64).view(np.uint64))
    lengths = varints.width if varints.lengths is None else varints.lengths
    # The prefix depends on the varint's length (1..10 bytes); all prefixes have the same width.
    table = np.stack([np.frombuffer(_entry_prefix(key, 0x1A, n), np.uint8) for n in range(1, 11)])
    prefixes = table[np.broadcast_to(lengths, (len(values),)) - 1]
    return [_Block(table.shape[1], data=prefixes), varints]


def _encode_string(key: bytes, values) -> list[_Block]:
    """Each distinct value is encoded once; rows pick theirs by index (a ``pd.Categorical``'s codes if given)."""
    import pandas as pd

    if isinstance(values, pd.Categorical):
        inverse, uniques = values.codes, values.categories
    else:
        inverse, uniques = pd.factorize(np.asarray(values).astype(object), use_na_sentinel=False)
    segments = [_entry_prefix(key, 0x0A, len(e)) + e for e in (str(u).encode() for u in uniques)]
    lengths = np.array([len(s) for s in segments], np.int64)
    table = np.zeros((len(segments), int(lengths.max(initial=0))), np.uint8)
    for i, segment in enumerate(segments):
        table[i, : len(segment)] = np.frombuffer(segment, np.uint8)
    padded = (lengths != table.shape[1]).any()
    return [_Block(table.shape[1], data=table[inverse], lengths=lengths[inverse] if padded else None,
                   codes=inverse, table=table)]


_ENCODERS = {"float32": _encode_float32, "int64": _encode_int64, "string": _encode_string}
