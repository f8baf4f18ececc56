"""Check raw rows against the spec; keep the good ones typed, quarantine the rest.

Reads ``raw/<dataset>/<partition>/data.csv`` (or ``data.parquet``, as the raw manifest's
``format`` says: sources with binary columns, such as images) in chunks (memory does
not grow with the file), a CSV laid out as the spec's source says (delimiter, quoting,
header or ``column_names``, encoding: :func:`read_csv_arguments`), and writes to
``validated/<dataset>/<partition>/``:

- ``data.parquet``: the valid rows, each feature cleaned and typed by its kind
  (:mod:`tfjobs.features`: stripped of surrounding whitespace, NA tokens made the
  kind's missing value, numbers parsed);
- ``quarantine.csv``: every rejected row as it was, with its CSV line (a Parquet file's row
  number) and the reason; a binary value shows as its size and first bytes;
- ``report.json`` (written last): counts, reasons, missing values per column, the label's classes.

A missing required column fails the step with an error that names the column, and so
do valid rows of a classification task that hold a single class (a model trained on
them would learn nothing, and pass its evaluation on a test split of that class).
A row is quarantined when a value's bytes are not valid in the source's encoding
(they are read as surrogates, ``errors="surrogateescape"``, and written back to
``quarantine.csv`` as delivered), when its label is missing or not a known class, when its
feature's kind rejects a value (a number that does not parse, ...), or when a value
is missing and the feature's policy is ``quarantine``. The served model cleans raw
values with the same rules (the kinds' ``parse_text``/``clean_tensor``). No row is dropped silently: rows in = valid + quarantined.

A delivery to score has no label (``label_required=False``, ``--no-label``): the label
is neither required nor checked, and ``data.parquet`` holds each valid row's CSV line
number (``_line``, as in ``quarantine.csv``), the spec's ``scoring.key`` columns as
delivered, and the features.

    python -m tfjobs.validate --spec include/penguins.yaml --raw <store>/raw/penguins/2026-11-25 \\
        --output <store>/validated/penguins/2026-11-25
"""

from __future__ import annotations

import argparse
import collections
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tfjobs import cli
from tfjobs.features.base import WHITESPACE
from tfjobs.spec import SPLITS, PipelineSpec, SourceSpec, load_spec
from tfjobs.storage.examples import arrow_type
from tfjobs.storage.raw_files import parquet_chunks
from tfjobs.storage.store import (
    join,
    local_copy,
    read_json,
    read_json_if_exists,
    sha256_file,
    staging_dir,
    store_for,
    write_json,
)

log = logging.getLogger(__name__)

DATA_FILE = "data.parquet"
QUARANTINE_FILE = "quarantine.csv"
REPORT = "report.json"
CHUNK_ROWS = 200_000
# Parquet row groups of this many rows: the shard step splits its work between processes by row group.
ROW_GROUP_ROWS = 65_536
LINE_COLUMN = "_line"
REASON_COLUMN = "_reason"
#: What bytes that do not decode become when read with errors="surrogateescape" (U+DC80-U+DCFF).
UNDECODABLE = "[\udc80-\udcff]"


class MissingColumnError(ValueError):
    """The raw data lacks a column the spec requires."""


class TooManyQuarantinedError(ValueError):
    """More rows were quarantined than the spec's ``max_quarantine_fraction`` allows."""


class TooFewClassesError(ValueError):
    """The valid rows of a classification task hold fewer than two classes."""


@dataclass(frozen=True)
class ValidateResult:
    data_uri: str
    report_uri: str
    quarantine_uri: str
    rows_in: int
    rows_valid: int
    rows_quarantined: int
    reasons: dict[str, int]
    rewritten: bool


def validate_dataset(spec: PipelineSpec, raw_uri: str, output_uri: str, *, label_required: bool = True
                     ) -> ValidateResult:
    raw_manifest_uri = join(raw_uri, "manifest.json")
    if not store_for(raw_manifest_uri).exists(raw_manifest_uri):
        raise FileNotFoundError(f"No raw data at {raw_uri} (no manifest.json): run the fetch step first")
    raw_manifest = read_json(raw_manifest_uri)
    report_uri = join(output_uri, REPORT)
    previous = read_json_if_exists(report_uri)
    if (previous and previous["raw_sha256"] == raw_manifest["sha256"] and previous["spec"] == spec.fingerprint()
            and previous.get("label_required", True) == label_required):
        log.info("Validated data at %s is up to date; nothing rewritten", output_uri)
        return _result(output_uri, previous, rewritten=False)

    store = store_for(output_uri)
    store.delete(report_uri)
    with local_copy(join(raw_uri, raw_manifest["file"])) as raw_path, staging_dir() as tmp:
        counts = _validate_csv(spec, raw_path, tmp / DATA_FILE, tmp / QUARANTINE_FILE, source=raw_uri,
                               raw_format=raw_manifest.get("format", "csv"), label_required=label_required)
        store.upload(tmp / DATA_FILE, join(output_uri, DATA_FILE))
        store.upload(tmp / QUARANTINE_FILE, join(output_uri, QUARANTINE_FILE))
        report = {
            "dataset": spec.name,
            "spec": spec.fingerprint(),
            "raw_sha256": raw_manifest["sha256"],
            "data_file": DATA_FILE,
            "data_sha256": sha256_file(tmp / DATA_FILE),
            "quarantine_file": QUARANTINE_FILE,
            **counts,
        }
        if not label_required:
            report.update(label_required=False, key=list(spec.scoring.key))
    _check_quarantine_share(spec, report, join(output_uri, QUARANTINE_FILE))
    if label_required:
        _check_classes(spec, report, raw_uri)
    write_json(report_uri, report)
    log.info(
        "Validated %d rows of %s: %d valid, %d quarantined %s",
        report["rows_in"], spec.name, report["rows_valid"], report["rows_quarantined"], report["reasons"],
    )
    return _result(output_uri, report, rewritten=True)


def _result(output_uri: str, report: dict, rewritten: bool) -> ValidateResult:
    return ValidateResult(
        data_uri=join(output_uri, report["data_file"]),
        report_uri=join(output_uri, REPORT),
        quarantine_uri=join(output_uri, report["quarantine_file"]),
        rows_in=report["rows_in"],
        rows_valid=report["rows_valid"],
        rows_quarantined=report["rows_quarantined"],
        reasons=report["reasons"],
        rewritten=rewritten,
    )


def arrow_schema(spec: PipelineSpec, label_required: bool = True):
    """The Parquet schema of validated data: spec columns in spec order, then the split column if any;
    for scoring, line and key first, and no label."""
    import pyarrow as pa

    if label_required:
        return pa.schema([pa.field(c.name, arrow_type(c.dtype), nullable=False) for c in spec.record_columns()]
                         + [pa.field(name, pa.string(), nullable=False) for name in spec.split_columns])
    return pa.schema([pa.field(LINE_COLUMN, pa.int64(), nullable=False)]
                     + [pa.field(name, pa.string(), nullable=False) for name in key_columns(spec)]
                     + [pa.field(f.column().name, arrow_type(f.column().dtype), nullable=False) for f in spec.features])


def key_columns(spec: PipelineSpec) -> list[str]:
    """The ``scoring.key`` columns that are not features: kept as delivered (a feature is kept as it is typed)."""
    features = {f.name for f in spec.features}
    return [name for name in spec.scoring.key if name not in features]


def required_columns(spec: PipelineSpec, label_required: bool = True) -> list[str]:
    """The columns a delivery must have: the spec's (and its split column) for training; for scoring,
    the ``scoring.key`` and the features."""
    if label_required:
        return [*spec.columns, *spec.split_columns]
    return list(dict.fromkeys([*spec.scoring.key, *(f.name for f in spec.features)]))


def _raw_chunks(raw_path, raw_format: str, source: SourceSpec):
    """The raw file in chunks of text columns (binary ones as bytes), and the line or row number of its first row."""
    if raw_format == "parquet":
        return parquet_chunks(raw_path), 1
    reader = pd.read_csv(raw_path, chunksize=CHUNK_ROWS, **read_csv_arguments(source))
    return reader, 2 if source.header else 1  # the header is line 1


def read_csv_arguments(source: SourceSpec) -> dict[str, Any]:
    """``pandas.read_csv`` arguments for a file laid out as ``source`` says, every value as delivered text.

    Values are Python strings (``object``), not Arrow's: a byte that does not decode is kept as a
    surrogate (``surrogateescape``), which Arrow strings cannot hold, so that its row is quarantined
    with the reason rather than the whole file failing.
    """
    return {
        **source.csv_dialect(),
        "header": 0 if source.header else None,
        "names": list(source.column_names) or None,
        "encoding": source.encoding,
        "encoding_errors": "surrogateescape",
        "dtype": object,
        "keep_default_na": False,
    }


def _validate_csv(spec: PipelineSpec, raw_path, data_path, quarantine_path, source: str,
                  raw_format: str = "csv", label_required: bool = True) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(spec, label_required)
    kept = required_columns(spec, label_required)
    reasons: collections.Counter[str] = collections.Counter()
    missing: collections.Counter[str] = collections.Counter()
    classes: collections.Counter[str] = collections.Counter()
    rows_in = rows_valid = rows_quarantined = 0
    na_values = set(spec.na_values)
    reader, first_line = _raw_chunks(raw_path, raw_format, spec.source)
    # surrogateescape: quarantined values with bytes that did not decode are written back as delivered.
    with pq.ParquetWriter(data_path, schema) as writer, open(quarantine_path, "w", newline="", encoding="utf-8",
                                                             errors="surrogateescape") as quarantine:
        header_written = False
        for chunk in reader:
            if rows_in == 0:
                columns = list(chunk.columns)
                _check_columns(spec, columns, source, label_required)
                extra = sorted(set(columns) - set(kept))
                kept = [*kept, *extra]  # what the quarantine shows of a row
            chunk.index = np.arange(rows_in, rows_in + len(chunk)) + first_line  # CSV line or Parquet row numbers
            rows_in += len(chunk)
            typed, row_reasons, chunk_reasons, chunk_missing = _check_chunk(spec, chunk, na_values, label_required)
            if not label_required:
                typed = {LINE_COLUMN: chunk.index.to_numpy(np.int64),
                         **{name: chunk[name].to_numpy(dtype=object) for name in key_columns(spec)}, **typed}
            reasons.update(chunk_reasons)
            missing.update(chunk_missing)
            bad = row_reasons != ""
            if bad.any():
                rejected = chunk.loc[bad, kept].copy()
                for name in spec.binary_features:  # mapped alone: inferring a text column's type fails on surrogates
                    rejected[name] = rejected[name].map(_quarantine_text)
                rejected.insert(0, LINE_COLUMN, rejected.index)
                rejected[REASON_COLUMN] = row_reasons[bad]
                rejected.to_csv(quarantine, index=False, header=not header_written)
                header_written = True
                rows_quarantined += int(bad.sum())
            good = {name: values[~bad] for name, values in typed.items()}
            rows_valid += int((~bad).sum())
            if label_required and spec.label.task == "classification":
                classes.update(good[spec.label.name])
            if (~bad).any():
                writer.write_table(pa.table(good, schema=schema), row_group_size=ROW_GROUP_ROWS)
        if rows_in == 0:
            raise ValueError(f"{source} has a header but no rows")
        if not header_written:
            pd.DataFrame(columns=[LINE_COLUMN, *kept, REASON_COLUMN]).to_csv(quarantine, index=False)
    return {
        "rows_in": rows_in,
        "rows_valid": rows_valid,
        "rows_quarantined": rows_quarantined,
        "reasons": dict(sorted(reasons.items())),
        "missing_values": {name: missing[name] for name in spec.columns if missing[name]},
        "ignored_columns": extra,
        "label_classes": dict(sorted(classes.items())),
    }


def _quarantine_text(value):
    """A value as the quarantine file shows it: a binary one (an image file) as its size and first bytes."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes: {value[:8].hex()}{'...' if len(value) > 8 else ''}>"
    return value


def _check_columns(spec: PipelineSpec, columns: list[str], source: str, label_required: bool = True) -> None:
    absent = [name for name in required_columns(spec, label_required) if name not in columns]
    if absent:
        features = {f.name for f in spec.features}
        roles = ", ".join(
            f"{name!r} (the label)" if name == spec.label.name
            else f"{name!r} (the split column)" if name in spec.split_columns
            else f"{name!r} (a {spec.feature(name).kind} feature)" if name in features
            else f"{name!r} (a scoring.key column)"
            for name in absent
        )
        raise MissingColumnError(
            f"Required column{'s' if len(absent) > 1 else ''} {roles} missing from the raw data at {source}; "
            f"its columns are {columns}. Fix the source or the spec's feature/label names."
        )


def _check_chunk(spec: PipelineSpec, chunk: pd.DataFrame, na_values: set[str], label_required: bool = True):
    """Typed columns, one reason string per row ('' when valid), counts by reason, missing counts."""
    row_reasons = pd.Series("", index=chunk.index, dtype=object)
    reason_counts: collections.Counter[str] = collections.Counter()
    typed: dict[str, np.ndarray] = {}
    missing: dict[str, int] = {}

    def reject(mask, reason: str, values: pd.Series | None = None) -> None:
        """Quarantine the rows in ``mask``; ``reason`` may hold a {value} placeholder."""
        mask = pd.Series(np.asarray(mask, bool), index=chunk.index)
        if not mask.any():
            return
        reason_counts[reason.replace(" {value}", "")] += int(mask.sum())
        before, _, after = reason.partition("{value}")
        text = before + values[mask].map(repr) + after if values is not None else reason
        previous = row_reasons[mask]
        row_reasons[mask] = previous.where(previous == "", previous + "; ") + text

    # A value whose bytes did not decode quarantines its row; the kinds clean an empty value in its place.
    texts = {}
    binary = spec.binary_features  # bytes as Parquet gave them: no text
    for name in [*(f.name for f in spec.features), *([spec.label.name] if label_required else [])]:
        if name in binary or chunk[name].dtype != object:  # Parquet's text was UTF-8 already: nothing undecodable
            texts[name] = chunk[name]
            continue
        undecodable = chunk[name].str.contains(UNDECODABLE, regex=True, na=False).to_numpy(bool)
        reject(undecodable, f"{name}: {{value}} is not valid {spec.source.encoding}", chunk[name])
        texts[name] = chunk[name].where(~undecodable, "").astype(str)

    for feature in spec.features:
        raw = texts[feature.name]
        cleaned = feature.clean(raw, na_values)
        missing[feature.name] = int(cleaned.missing.sum())
        if feature.missing == "quarantine":
            reject(cleaned.missing, f"{feature.name}: missing value (policy: quarantine)")
        for rows, reason in cleaned.rejected:
            shown = raw.str.strip(WHITESPACE) if "{value}" in reason else None  # binary values have no text
            reject(rows, f"{feature.name}: {reason}", shown)
        typed[feature.name] = cleaned.values

    if not label_required:
        return typed, row_reasons, reason_counts, missing
    label = spec.label
    values = texts[label.name].str.strip(WHITESPACE)
    is_na = values.isin(na_values)
    missing[label.name] = int(is_na.sum())
    reject(is_na, f"{label.name}: missing label")
    if label.task == "classification":
        unknown = ~is_na & ~values.isin(label.classes)
        reject(unknown, f"{label.name}: label {{value}} is not one of the spec's classes", values)
        typed[label.name] = values.to_numpy(dtype=object)
    else:
        parsed = pd.to_numeric(values.where(~is_na), errors="coerce").astype("float64")
        reject(~is_na & ~np.isfinite(parsed), f"{label.name}: cannot parse label {{value}} as a number", values)
        typed[label.name] = parsed.fillna(0).astype(np.float32).to_numpy()
    for name in spec.split_columns:
        splits = chunk[name].str.strip(WHITESPACE)
        reject(~splits.isin(SPLITS), f"{name}: split {{value}} is not one of {', '.join(SPLITS)}", splits)
        typed[name] = splits.to_numpy(dtype=object)
    return typed, row_reasons, reason_counts, missing


def _check_quarantine_share(spec: PipelineSpec, report: dict, quarantine_uri: str) -> None:
    share = report["rows_quarantined"] / report["rows_in"]
    if report["rows_valid"] == 0 or share > spec.max_quarantine_fraction:
        common = sorted(report["reasons"].items(), key=lambda kv: -kv[1])[:3]
        raise TooManyQuarantinedError(
            f"{report['rows_quarantined']} of {report['rows_in']} rows ({share:.1%}) were quarantined, more than "
            f"the spec's max_quarantine_fraction {spec.max_quarantine_fraction:.1%}. Most common reasons: {common}. "
            f"The rows and their reasons are in {quarantine_uri}."
        )


def _check_classes(spec: PipelineSpec, report: dict, source: str) -> None:
    classes = report["label_classes"]
    if spec.label.task == "classification" and len(classes) < 2:
        raise TooFewClassesError(
            f"All {report['rows_valid']} valid rows of {source} are of one class, {spec.label.name} "
            f"{next(iter(classes))!r}: a classifier learns nothing from one class. The spec's classes are "
            f"{list(spec.label.classes)}; check the source (an export filtered by the label?) or the label column."
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--raw", required=True, help="raw data prefix URI (the fetch step's output)")
    parser.add_argument("--output", required=True, help="output prefix URI")
    parser.add_argument("--no-label", action="store_true", help="a delivery to score: the label is not required")
    args = cli.parse(parser, argv)
    cli.print_result(validate_dataset(load_spec(args.spec), args.raw, args.output, label_required=not args.no_label))


if __name__ == "__main__":
    main()
