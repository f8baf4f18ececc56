"""TFRecord files written in bulk: framing, masked CRC32C and GZIP for a whole batch of records.

A TFRecord file is a sequence of::

    uint64 length (little-endian) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

``tf.io.TFRecordWriter.write`` takes one record per Python call (a few
microseconds each, measured in ``benchmarks/bench_shard.py``), which caps a
writer near its per-call rate however fast the records are encoded. This module
frames a whole batch at once, in the padded rows the encoder leaves room in:
lengths and their CRCs with NumPy (records of one length share one CRC), each
record's CRC32C carried through the pieces the records are made of, by table
lookups (:func:`record_crc32c`, checked against Google's ``google-crc32c``), and the
framed bytes go through gzip, compressed by Intel's ISA-L (``isal``; the same gzip
format that TensorFlow writes and reads, several times faster than zlib); records of
encoded files (images) go into stored deflate blocks (:func:`gzip_level`). Files read
back with ``tf.data.TFRecordDataset`` (the tests check it, record for record).
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
from isal import isal_zlib

from tfjobs.storage.examples import Column, EncodedRows, PaddedRows

_MASK_DELTA = 0xA282EAD8
COMPRESSIONS = ("GZIP", "")
#: What Shardline writes shards with.
COMPRESSION = "GZIP"
# ISA-L's level 2 compresses these records about as well as zlib's default level 6 (which
# TensorFlow's GZIP writer uses) at 10x the speed (benchmarks/bench_shard.py).
DEFAULT_GZIP_LEVEL = 2
#: GZIP members whose deflate blocks are stored, not compressed (:class:`StoredGzipMember`).
STORED = "stored"


def gzip_level(columns: Sequence[Column]) -> int | str:
    """How to GZIP records of ``columns``: stored when they hold encoded files (a ``bytes`` column).

    PNG and JPEG files are compressed already: ISA-L's level 2 saves 3% of a shard of
    images for 40% of the shard fast path's time (``benchmarks/bench_images.py``). The
    shards stay GZIP files, which every reader of them expects.
    """
    return STORED if any(column.dtype == "bytes" for column in columns) else DEFAULT_GZIP_LEVEL


def masked_crc32c(data: bytes) -> int:
    """The CRC32C TFRecord stores: rotated right by 15 bits, plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


FRAMING = (12, 4)  # bytes before a record (length, its CRC) and after it (the record's CRC)


def frame_in_place(rows: PaddedRows) -> np.ndarray:
    """Fill the framing bytes that ``encode_padded(..., reserve=FRAMING)`` left, and join the records."""
    data = rows.data
    if not len(data):
        return rows.compact()
    lengths = rows.lengths - sum(FRAMING)
    crcs = record_crc32c(rows)
    # Records of one length share the length's CRC: one per length between the shortest and the longest,
    # or, when they are far apart (a few long records among short ones), one per distinct length.
    shortest, longest = int(lengths.min()), int(lengths.max())
    if longest - shortest < len(lengths):
        distinct, which = np.arange(shortest, longest + 1), lengths - shortest
    else:
        distinct, which = np.unique(lengths, return_inverse=True)
    length_crcs = np.array([masked_crc32c(n.to_bytes(8, "little")) for n in distinct.tolist()], np.uint32)[which]
    data[:, 0:8] = lengths.astype("<u8").view(np.uint8).reshape(-1, 8)
    data[:, 8:12] = length_crcs.astype("<u4").view(np.uint8).reshape(-1, 4)
    # The record's CRC goes right after its last valid byte: into the last 4 columns, which are always valid.
    data[:, -4:] = _mask(crcs).astype("<u4").view(np.uint8).reshape(-1, 4)
    return rows.compact()  # a contiguous uint8 array: written and hashed without another copy


#: Framed bytes of padded rows built at a time (the matrix, its mask and the framed copy are about 3x this).
CHUNK_BYTES = 32 << 20
#: A record longer than this many times the median of its batch is an outlier: it is framed with
#: the other outliers, so that it does not widen the padded rows of every other record.
OUTLIER_FACTOR = 4


@dataclass(frozen=True)
class FramedRecords:
    """Framed records, built a chunk at a time: position i's bytes are ``chunks[chunk[i]][start[i]:end[i]]``."""

    chunks: list[np.ndarray]
    chunk: np.ndarray  # int64 [records]
    start: np.ndarray  # int64 [records]
    end: np.ndarray  # int64 [records]

    def runs(self, key: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(first, stop, bytes)`` of each run of positions of one ``key`` whose bytes lie back to back."""
        if not len(key):
            return
        # Positions of one chunk are consecutive in it: a run ends where the chunk or the key changes.
        cuts = np.flatnonzero((self.chunk[1:] != self.chunk[:-1]) | (key[1:] != key[:-1])) + 1
        bounds = [0, *cuts.tolist(), len(key)]
        for first, stop in zip(bounds[:-1], bounds[1:]):
            yield first, stop, self.chunks[self.chunk[first]][self.start[first] : self.end[stop - 1]]


def frame_in_chunks(records: EncodedRows, order: np.ndarray | None = None, budget: int | None = None
                    ) -> FramedRecords:
    """The records ``order`` lists (all, when None), framed, in padded matrices of at most ``budget``
    bytes (``CHUNK_BYTES``) each.

    Memory follows bytes, not rows: the usual records are built in order, as many at a
    time as ``budget`` holds at their width; the outliers (longer than ``OUTLIER_FACTOR``
    times the median) are built among themselves, so one long value widens no one
    else's row. The bytes do not depend on the chunks: each record is the same bytes
    however it was built.
    """
    budget = budget or CHUNK_BYTES
    count = len(records) if order is None else len(order)

    def rows(positions):
        return positions if order is None else order[positions]

    lengths = records.lengths[rows(slice(None))] + sum(FRAMING)
    outlier = np.zeros(count, bool)
    if count and lengths.max() > OUTLIER_FACTOR * lengths.min():  # else there can be none
        outlier = lengths > OUTLIER_FACTOR * np.median(lengths)
    groups: list = []  # the positions of each chunk: slices, or arrays when outliers are left out
    if outlier.any():
        usual = np.flatnonzero(~outlier)
        per_chunk = max(1, budget // (records.width(rows(usual)) + sum(FRAMING)))
        groups += [usual[i : i + per_chunk] for i in range(0, len(usual), per_chunk)]
    elif count:
        per_chunk = max(1, budget // (records.width() + sum(FRAMING)))
        groups += [slice(i, i + per_chunk) for i in range(0, count, per_chunk)]
    first, widest = 0, 0
    outliers = np.flatnonzero(outlier)
    for i, length in enumerate(lengths[outliers].tolist()):  # outliers in order, as many as fit the budget
        if i > first and (i - first + 1) * max(widest, length) > budget:
            groups.append(outliers[first:i])
            first, widest = i, 0
        widest = max(widest, length)
    if len(outliers):
        groups.append(outliers[first:])
    chunks = []
    chunk, start, end = (np.zeros(count, np.int64) for _ in range(3))
    for index, positions in enumerate(groups):
        padded = records.padded(rows(positions), reserve=FRAMING)
        chunks.append(frame_in_place(padded))
        ends = np.cumsum(padded.lengths)
        chunk[positions], start[positions], end[positions] = index, ends - padded.lengths, ends
    return FramedRecords(chunks, chunk, start, end)


def record_crc32c(rows: PaddedRows) -> np.ndarray:
    """CRC32C of each record (its body, between the framing), without a Python call per row.

    A CRC register is linear over GF(2): after a piece ``b`` it is
    ``shift(register, len(b)) ^ crc0(b)``, where ``shift`` is the effect of ``len(b)`` zero
    bytes and ``crc0`` the CRC with no initial value. So the records' registers are
    carried through the pieces they are made of (``rows.body``), all rows at once:
    a shift is four 256-entry table lookups, a byte that differs between rows is one
    lookup, bytes the same in every row are one constant per run, and a piece that
    holds a table of distinct values (a string feature) costs one lookup per row, its
    values' CRCs being computed once. Checked against Google's ``google-crc32c``.
    """
    register: np.ndarray | int = 0xFFFFFFFF  # every row's register, one number while they are all the same
    run: list = []  # fixed-width pieces not yet folded in

    def fold_run(register):
        width = sum(piece.width for piece in run)
        if not width:
            return register
        register = _shift(register, width)
        constant = b"".join(bytes(piece.width) if piece.varies else piece.constant for piece in run)
        register ^= _crc0(constant)
        end = width
        for piece in reversed(run):
            end -= piece.width
            if piece.varies:
                distances = range(width - end - 1, width - end - 1 - piece.width, -1)  # of each byte to the run's end
                for j, distance in enumerate(distances):
                    register = register ^ _byte_tables(distance)[piece.data[:, j]]
        run.clear()
        return register

    for piece in rows.body:
        if piece.codes is None and piece.lengths is None:
            run.append(piece)
            continue
        register = np.broadcast_to(np.asarray(fold_run(register), np.uint32), rows.lengths.shape)
        if piece.codes is not None:  # each table value's CRC, then a shift by its length and a lookup per row
            contribution = np.array([_crc0(value) for value in piece.values], np.uint32)
            register = _shift_by_code(register, piece.codes, piece.table_lengths) ^ contribution[piece.codes]
        else:  # rows grouped by their length
            register = register.copy()
            for n in np.unique(piece.lengths).tolist():
                which = np.flatnonzero(piece.lengths == n)
                part = _shift(register[which], n)
                for j in range(n):
                    part ^= _byte_tables(n - 1 - j)[piece.data[which, j]]
                register[which] = part
    register = fold_run(register)
    return np.broadcast_to(np.asarray(register, np.uint32) ^ np.uint32(0xFFFFFFFF), rows.lengths.shape).copy()


_POLYNOMIAL = 0x82F63B78  # CRC32C (Castagnoli), bit-reflected


@functools.lru_cache(maxsize=1024)
def _zero_byte_images(count: int) -> tuple[int, ...]:
    """The register after ``count`` zero bytes, for each of its 32 one-bit starting values."""
    if count == 0:
        return tuple(1 << bit for bit in range(32))
    if count == 1:
        images = []
        for bit in range(32):
            register = 1 << bit
            for _ in range(8):
                register = (register >> 1) ^ (_POLYNOMIAL if register & 1 else 0)
            images.append(register)
        return tuple(images)
    half = _zero_byte_images(count // 2)
    rest = _zero_byte_images(count - count // 2)
    return tuple(_apply(half, image) for image in rest)


def _apply(images: tuple[int, ...], register: int) -> int:
    out = 0
    for bit in range(32):
        if register >> bit & 1:
            out ^= images[bit]
    return out


@functools.lru_cache(maxsize=1024)
def _shift_tables(count: int) -> np.ndarray:
    """[4, 256]: the effect of ``count`` zero bytes on each byte of a register, by value."""
    images = np.array(_zero_byte_images(count), np.uint32).reshape(4, 8)
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)  # [256, 8]
    return np.bitwise_xor.reduce(np.where(bits[None], images[:, None, :], np.uint32(0)), axis=2)


def _shift(register, count: int):
    """Registers after ``count`` zero bytes (an int, or an array of them)."""
    if isinstance(register, int):
        return _apply(_zero_byte_images(count), register)
    tables = _shift_tables(count)
    return (tables[0][register & 0xFF] ^ tables[1][(register >> 8) & 0xFF]
            ^ tables[2][(register >> 16) & 0xFF] ^ tables[3][register >> 24])


#: Up to this many distinct lengths, a shift by each row's length is one lookup in stacked tables.
_STACKED_SHIFTS = 32


def _shift_by_code(register: np.ndarray, codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Row i's register after ``counts[codes[i]]`` zero bytes.

    The tables go by distinct count, not by code: a table of distinct values (long
    strings, each different) has few lengths, or, when it has many, is shifted by
    the shortest and then by each power of two the rest of a row's length holds.
    """
    distinct, which = np.unique(counts, return_inverse=True)
    if len(distinct) == 1:
        return _shift(register, int(distinct[0]))
    if len(distinct) <= _STACKED_SHIFTS:
        tables = np.stack([_shift_tables(int(n)) for n in distinct]).reshape(-1)  # [lengths, 4, 256]
        base = which[codes].astype(np.intp) * 1024
        return (tables[base + (register & 0xFF)] ^ tables[base + 256 + ((register >> 8) & 0xFF)]
                ^ tables[base + 512 + ((register >> 16) & 0xFF)] ^ tables[base + 768 + (register >> 24)])
    rest = (counts - distinct[0])[codes]
    register = _shift(register, int(distinct[0]))
    for bit in range(int(rest.max()).bit_length()):
        rows = np.flatnonzero((rest >> bit) & 1)
        register[rows] = _shift(register[rows], 1 << bit)
    return register


def _byte_tables(distance: int) -> np.ndarray:
    """crc0 of a byte followed by ``distance`` zero bytes, by the byte's value."""
    return _shift_tables(distance + 1)[0]


def _crc0(data: bytes) -> int:
    """The CRC register's change over ``data`` from a zero register (no initial value, no final XOR)."""
    return google_crc32c.value(data) ^ _zeros_crc(len(data))


@functools.lru_cache(maxsize=4096)
def _zeros_crc(count: int) -> int:
    return google_crc32c.value(bytes(count))


def _mask(crcs: np.ndarray) -> np.ndarray:
    crcs = crcs.astype(np.uint64)
    return ((((crcs >> 15) | (crcs << 17)) + _MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)


class StoredGzipMember:
    """One gzip member of stored (uncompressed) deflate blocks, made without copying the data.

    What zlib's level 0 writes, in the same format (RFC 1951's stored blocks inside RFC 1952's
    gzip member): zlib passes every byte through its window, 63 ms of the 190 ms the fast path
    spent on 20,000 encoded images (52 MB, ``benchmarks/bench_images.py``); here each block is
    a 5-byte header before a view of the data, and the member's CRC-32 is zlib's (7 GB/s here).
    """

    HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\x03"  # deflate, no name, mtime 0, level 0's XFL, Unix
    BLOCK = 65_535  # the most a stored block holds

    def __init__(self) -> None:
        self._crc = 0
        self._size = 0
        self._started = False

    def _header(self) -> list:
        started, self._started = self._started, True
        return [] if started else [self.HEADER]

    def compress(self, data) -> list:
        """The member's next bytes: non-final stored blocks holding ``data``, as a list of buffers."""
        view = memoryview(data).cast("B")
        pieces = self._header()
        for start in range(0, len(view), self.BLOCK):
            block = view[start : start + self.BLOCK]
            pieces += [struct.pack("<BHH", 0, len(block), len(block) ^ 0xFFFF), block]
        self._crc = zlib.crc32(view, self._crc)
        self._size += len(view)
        return pieces

    def flush(self) -> list:
        """The member's end: an empty final block, then the CRC-32 and length of the data."""
        return [*self._header(), b"\x01\x00\x00\xff\xff", struct.pack("<II", self._crc, self._size & 0xFFFFFFFF)]


class DeflatedGzipMember:
    """One gzip member compressed by ISA-L's deflate, with :class:`StoredGzipMember`'s interface (lists of buffers)."""

    def __init__(self, level: int) -> None:
        # wbits=31: a gzip member (header mtime 0, so the same records give the same bytes).
        self._deflate = isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)

    def compress(self, data) -> list:
        return [self._deflate.compress(data)]

    def flush(self) -> list:
        return [self._deflate.flush()]


class TFRecordFileWriter:
    """Appends batches of records to one TFRecord file, GZIP-compressed or not.

    A GZIP file may hold several gzip members back to back (``end_member``), as
    gzip allows and TensorFlow reads: files written in parts by several processes
    and concatenated are then the same bytes as one written whole.
    """

    def __init__(self, path: str | Path, compression: str = "GZIP", level: int | str = DEFAULT_GZIP_LEVEL):
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._level = level if compression == "GZIP" else None
        self._member = None  # the open gzip member (its compressor)
        self.records = 0
        self.bytes = 0
        self._digest = hashlib.sha256()  # of the file's bytes, so nobody has to read it back

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def hash_state(self):
        """A copy of the SHA-256 state over the bytes written so far, to hash more bytes onto."""
        return self._digest.copy()

    def _emit(self, *pieces) -> None:
        for data in pieces:
            self._file.write(data)
            self._digest.update(data)
            self.bytes += len(data)

    def write(self, rows: PaddedRows) -> None:
        """Append records encoded with ``encode_padded(..., reserve=FRAMING)``."""
        if len(rows.data):
            self.write_framed(frame_in_place(rows), len(rows.data))

    def write_framed(self, framed: np.ndarray, records: int) -> None:
        """Append ``records`` records already framed (``frame_in_place``), back to back."""
        if not records:
            return
        if self._level is not None and self._member is None:
            self._member = StoredGzipMember() if self._level == STORED else DeflatedGzipMember(self._level)
        self._emit(*(self._member.compress(framed) if self._member is not None else [framed]))
        self.records += records

    def end_member(self) -> None:
        """Finish the open gzip member, if any: the next records start a new one."""
        if self._member is not None:
            self._emit(*self._member.flush())
            self._member = None

    def close(self) -> None:
        self.end_member()
        self._file.close()

    def __enter__(self) -> TFRecordFileWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
