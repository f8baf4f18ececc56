"""TFRecord files written in bulk: framing, masked CRC32C and GZIP for a whole batch of records.

A TFRecord file is a sequence of::

    uint64 length (little-endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

``tf.io.TFRecordWriter.write`` takes one record per Python call (a few
microseconds each, measured in ``benchmarks/bench_shard.py``), which caps a
writer near its per-call rate however fast the records are encoded. This module
frames a whole batch at once, in the padded rows the encoder leaves room in:
lengths and their CRCs with NumPy (records of one length share one CRC), each
record's CRC32C by table lookups over the bytes that differ between records
(:func:`record_crc32c`, checked against Google's ``google-crc32c``), and the framed bytes go
through one gzip stream per file, compressed by Intel's ISA-L (``isal``; the same
gzip format that TensorFlow writes and reads, several times faster than zlib). Files read back with
``tf.data.TFRecordDataset`` (the tests check it, record for record).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import google_crc32c
import numpy as np
from isal import isal_zlib

from tfjobs.examples import PaddedRows

_MASK_DELTA = 0xA282EAD8
COMPRESSIONS = ("GZIP", "")
# ISA-L's level 2 compresses these records about as well as zlib's default level 6 (which
# TensorFlow's GZIP writer uses) at 10x the speed (benchmarks/bench_shard.py).
DEFAULT_GZIP_LEVEL = 2


def masked_crc32c(data: bytes) -> int:
    """The CRC32C TFRecord stores: rotated right by 15 bits, plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


FRAMING = (12, 4)  # bytes before a record (length, its CRC) and after it (the record's CRC)


def frame_in_place(rows: PaddedRows) -> np.ndarray:
    """Fill the framing bytes that ``encode_padded(..., reserve=FRAMING)`` left, and join the records."""
    data = rows.data
    lengths = rows.lengths - sum(FRAMING)
    crcs = record_crc32c(rows)
    distinct, which = np.unique(lengths, return_inverse=True)
    length_crcs = np.array([masked_crc32c(int(n).to_bytes(8, "little")) for n in distinct], np.uint32)[which]
    data[:, 0:8] = lengths.astype("<u8").view(np.uint8).reshape(-1, 8)
    data[:, 8:12] = length_crcs.astype("<u4").view(np.uint8).reshape(-1, 4)
    # The record's CRC goes right after its last valid byte: into the last 4 columns, which are always valid.
    data[:, -4:] = _mask(crcs).astype("<u4").view(np.uint8).reshape(-1, 4)
    return rows.compact()  # a contiguous uint8 array: written and hashed without another copy


def record_crc32c(rows: PaddedRows) -> np.ndarray:
    """CRC32C of each record (the valid bytes between the framing), without a Python call per row.

    A CRC is linear over GF(2) for messages of one length: crc(m) = crc(t) ^ crc0(m ^ t),
    where crc0 has no initial value and no final XOR. Rows of one layout have the
    same length; against the layout's first row as the template t, ``m ^ t`` is zero
    except in the value columns (keys and framing are the same in every record), and
    crc0 of it is the XOR, over those columns, of one 256-entry table lookup each.
    A categorical block (a string feature) costs one lookup per row: its contribution
    is computed once per distinct value.
    """
    data, valid = rows.data, rows.valid
    body = np.zeros(data.shape[1], bool)
    body[FRAMING[0] : data.shape[1] - FRAMING[1]] = True
    value_columns = rows.value_columns
    values = data[:, value_columns]
    groups = [np.arange(len(data))] if rows.layout is None else _groups(rows.layout)
    crcs = np.empty(len(data), np.uint32)
    for group in groups:
        first = group[0]
        mask = body if valid is None else body & valid[first]
        length = int(mask.sum())
        position = np.cumsum(mask) - 1  # a column's byte position in the record
        template = data[first]
        crc = np.full(len(group), google_crc32c.value(template[mask].tobytes()), np.uint32)
        keep = mask[value_columns]
        if keep.any():
            differences = (values[group] if len(group) < len(data) else values)[:, keep] ^ template[value_columns[keep]]
            tables = _position_tables(length, tuple(position[value_columns[keep]].tolist()))
            for j in range(len(tables)):
                crc ^= tables[j][differences[:, j]]
        for block in rows.categorical:
            # One contribution per distinct value, then one lookup per row.
            columns = np.arange(block.start, block.start + block.table.shape[1])
            used = np.flatnonzero(mask[columns])
            differences = block.table[:, used] ^ block.table[block.codes[first], used]
            tables = _position_tables(length, tuple(position[columns[used]].tolist()))
            contribution = np.zeros(len(block.table), np.uint32)
            for j in range(len(tables)):
                contribution ^= tables[j][differences[:, j]]
            crc ^= contribution[block.codes[group]]
        crcs[group] = crc
    return crcs


def _groups(labels: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)


def _mask(crcs: np.ndarray) -> np.ndarray:
    crcs = crcs.astype(np.uint64)
    return ((((crcs >> 15) | (crcs << 17)) + _MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)


@functools.lru_cache(maxsize=4096)
def _position_tables(length: int, positions: tuple[int, ...]) -> np.ndarray:
    """For each position p: crc0 of a ``length``-byte message holding byte x at p, for all x."""
    zeros_crc = google_crc32c.value(bytes(length))
    message = bytearray(length)
    basis = np.empty((len(positions), 8), np.uint32)
    for i, position in enumerate(positions):
        for bit in range(8):
            message[position] = 1 << bit
            basis[i, bit] = google_crc32c.value(bytes(message)) ^ zeros_crc
        message[position] = 0
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # [256, 8]
    tables = np.zeros((len(positions), 256), np.uint32)
    for bit in range(8):
        tables ^= np.where(bits[:, bit], basis[:, bit : bit + 1], np.uint32(0))
    return tables


class TFRecordFileWriter:
    """Appends batches of records to one TFRecord file, GZIP-compressed or not."""

    def __init__(self, path: str | Path, compression: str = "GZIP", level: int = DEFAULT_GZIP_LEVEL):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.path = Path(path)
        self._file = open(self.path, "wb")
        # wbits=31: a gzip stream (header mtime 0, so the same records give the same bytes).
        self._zlib = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31) if compression == "GZIP" else None
        self.records = 0
        self.bytes = 0
        self._digest = hashlib.sha256()  # of the file's bytes, so nobody has to read it back

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _emit(self, data) -> None:
        self._file.write(data)
        self._digest.update(data)
        self.bytes += len(data)

    def write(self, rows: PaddedRows) -> None:
        """Append records encoded with ``encode_padded(..., reserve=FRAMING)``."""
        if not len(rows.data):
            return
        framed = frame_in_place(rows)
        self._emit(self._zlib.compress(framed) if self._zlib else framed)
        self.records += len(rows.data)

    def close(self) -> None:
        if self._zlib is not None:
            self._emit(self._zlib.flush())
        self._file.close()

    def __enter__(self) -> TFRecordFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
