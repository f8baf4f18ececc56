"""Raw data files, as the fetch step writes them and the validate step reads them.

A delivery of text columns stays the CSV it came as. A source with a binary column
(an encoded image) cannot round-trip through CSV, so its rows go to Parquet from the
fetch on: ``raw/<dataset>/<partition>/data.parquet``, written in row groups as the
source streams, never whole in memory. The raw manifest's ``format`` says which
(``csv`` when absent: manifests written before Parquet existed).

The validate step reads Parquet in chunks of a bounded size, with every column but
the binary ones as text: the same view of a value as a CSV cell gives, so the
feature kinds clean both alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

#: Raw formats and the file each is written to.
RAW_FILES = {"csv": "data.csv", "parquet": "data.parquet"}
#: A Parquet row group holds up to this many bytes of rows (fewer rows when they are big images).
ROW_GROUP_BYTES = 32 << 20
#: The validate step reads a Parquet raw file in chunks of at most this many bytes (as stored).
CHUNK_BYTES = 64 << 20


def raw_format(path: Path) -> str:
    """The format of a raw file, by its name."""
    for name, file in RAW_FILES.items():
        if path.name == file:
            return name
    raise ValueError(f"{path.name} is not a raw data file ({sorted(RAW_FILES.values())})")


def parquet_rows(path: Path) -> tuple[int, list[str]]:
    """Rows and column names of a Parquet raw file."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    return metadata.num_rows, list(metadata.schema.to_arrow_schema().names)


def write_parquet(batches: Iterable, path: Path, schema) -> int:
    """Write record batches (``pyarrow.RecordBatch``), one row group each, to ``path``; return the rows written.

    Sources cut their batches by content (files read until ``ROW_GROUP_BYTES``), so the
    same rows make the same file wherever they were read from: a local folder or S3.
    """
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
    return rows


def parquet_chunks(path: Path) -> Iterator:
    """A Parquet raw file as pandas chunks of at most ``CHUNK_BYTES``: binary columns as ``bytes``
    (``None`` for a null), every other column as text (``""`` for a null), as a CSV cell would be."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    metadata = parquet.metadata
    stored = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    rows_per_chunk = max(1, min(200_000, CHUNK_BYTES * max(metadata.num_rows, 1) // max(stored, 1)))
    for batch in parquet.iter_batches(batch_size=rows_per_chunk):
        columns = {}
        for name, column in zip(batch.schema.names, batch.columns):
            if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                columns[name] = column
            else:
                columns[name] = pc.fill_null(column.cast(pa.string()), "")
        yield pa.table(columns).to_pandas()
