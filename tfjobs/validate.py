"""Check raw rows against the spec; keep the good ones typed, quarantine the rest.

Reads ``raw/<dataset>/<partition>/data.csv`` in chunks (memory does not grow with
the file) and writes to ``validated/<dataset>/<partition>/``:

- ``data.parquet``: the valid rows, each feature cleaned and typed by its kind
  (:mod:`tfjobs.features`: stripped of surrounding whitespace, NA tokens made the
  kind's missing value, numbers parsed);
- ``quarantine.csv``: every rejected row as it was, with its CSV line and the reason;
- ``report.json`` (written last): counts, reasons, missing values per column, the label's classes.

A missing required column fails the step with an error that names the column, and so
do valid rows of a classification task that hold a single class (a model trained on
them would learn nothing, and pass its evaluation on a test split of that class).
A row is quarantined when its label is missing or not a known class, when its
feature's kind rejects a value (a number that does not parse, ...), or when a value
is missing and the feature's policy is ``quarantine``. The served model cleans raw
values with the same rules (the kinds' ``parse_text``/``clean_tensor``). No row is dropped silently: rows in = valid + quarantined.

    python -m tfjobs.validate --spec include/penguins.yaml --raw <store>/raw/penguins/2026-11-25 \\
        --output <store>/validated/penguins/2026-11-25
"""

from __future__ import annotations

import argparse
import collections
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tfjobs import cli
from tfjobs.features.base import WHITESPACE
from tfjobs.spec import PipelineSpec, load_spec
from tfjobs.storage.examples import arrow_type
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


def validate_dataset(spec: PipelineSpec, raw_uri: str, output_uri: str) -> ValidateResult:
    raw_manifest_uri = join(raw_uri, "manifest.json")
    if not store_for(raw_manifest_uri).exists(raw_manifest_uri):
        raise FileNotFoundError(f"No raw data at {raw_uri} (no manifest.json): run the fetch step first")
    raw_manifest = read_json(raw_manifest_uri)
    report_uri = join(output_uri, REPORT)
    previous = read_json_if_exists(report_uri)
    if previous and previous["raw_sha256"] == raw_manifest["sha256"] and previous["spec"] == spec.fingerprint():
        log.info("Validated data at %s is up to date; nothing rewritten", output_uri)
        return _result(output_uri, previous, rewritten=False)

    store = store_for(output_uri)
    store.delete(report_uri)
    with local_copy(join(raw_uri, raw_manifest["file"])) as raw_path, staging_dir() as tmp:
        counts = _validate_csv(spec, raw_path, tmp / DATA_FILE, tmp / QUARANTINE_FILE, source=raw_uri)
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
    _check_quarantine_share(spec, report, join(output_uri, QUARANTINE_FILE))
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


def arrow_schema(spec: PipelineSpec):
    """The Parquet schema of validated data: spec columns in spec order."""
    import pyarrow as pa

    return pa.schema([pa.field(c.name, arrow_type(c.dtype), nullable=False) for c in spec.record_columns()])


def _validate_csv(spec: PipelineSpec, raw_path, data_path, quarantine_path, source: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(spec)
    reasons: collections.Counter[str] = collections.Counter()
    missing: collections.Counter[str] = collections.Counter()
    classes: collections.Counter[str] = collections.Counter()
    rows_in = rows_valid = rows_quarantined = 0
    na_values = set(spec.na_values)
    reader = pd.read_csv(raw_path, dtype=str, keep_default_na=False, chunksize=CHUNK_ROWS)
    with pq.ParquetWriter(data_path, schema) as writer, open(quarantine_path, "w", newline="") as quarantine:
        header_written = False
        for chunk in reader:
            if rows_in == 0:
                columns = list(chunk.columns)
                _check_columns(spec, columns, source)
                extra = sorted(set(columns) - set(spec.columns))
            chunk.index = np.arange(rows_in, rows_in + len(chunk)) + 2  # CSV line numbers (header is line 1)
            rows_in += len(chunk)
            typed, row_reasons, chunk_reasons, chunk_missing = _check_chunk(spec, chunk, na_values)
            reasons.update(chunk_reasons)
            missing.update(chunk_missing)
            bad = row_reasons != ""
            if bad.any():
                rejected = chunk.loc[bad, list(spec.columns)].copy()
                rejected.insert(0, LINE_COLUMN, rejected.index)
                rejected[REASON_COLUMN] = row_reasons[bad]
                rejected.to_csv(quarantine, index=False, header=not header_written)
                header_written = True
                rows_quarantined += int(bad.sum())
            good = {name: values[~bad] for name, values in typed.items()}
            rows_valid += int((~bad).sum())
            if spec.label.task == "classification":
                classes.update(good[spec.label.name])
            if len(good[spec.label.name]):
                writer.write_table(pa.table(good, schema=schema), row_group_size=ROW_GROUP_ROWS)
        if rows_in == 0:
            raise ValueError(f"{source} has a header but no rows")
        if not header_written:
            pd.DataFrame(columns=[LINE_COLUMN, *spec.columns, REASON_COLUMN]).to_csv(quarantine, index=False)
    return {
        "rows_in": rows_in,
        "rows_valid": rows_valid,
        "rows_quarantined": rows_quarantined,
        "reasons": dict(sorted(reasons.items())),
        "missing_values": {name: missing[name] for name in spec.columns if missing[name]},
        "ignored_columns": extra,
        "label_classes": dict(sorted(classes.items())),
    }


def _check_columns(spec: PipelineSpec, columns: list[str], source: str) -> None:
    absent = [name for name in spec.columns if name not in columns]
    if absent:
        roles = ", ".join(
            f"{name!r} (the label)" if name == spec.label.name else f"{name!r} (a {spec.feature(name).kind} feature)"
            for name in absent
        )
        raise MissingColumnError(
            f"Required column{'s' if len(absent) > 1 else ''} {roles} missing from the raw data at {source}; "
            f"its columns are {columns}. Fix the source or the spec's feature/label names."
        )


def _check_chunk(spec: PipelineSpec, chunk: pd.DataFrame, na_values: set[str]):
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

    for feature in spec.features:
        raw = chunk[feature.name]
        cleaned = feature.clean(raw, na_values)
        missing[feature.name] = int(cleaned.missing.sum())
        if feature.missing == "quarantine":
            reject(cleaned.missing, f"{feature.name}: missing value (policy: quarantine)")
        for rows, reason in cleaned.rejected:
            reject(rows, f"{feature.name}: {reason}", raw.str.strip(WHITESPACE))
        typed[feature.name] = cleaned.values

    label = spec.label
    values = chunk[label.name].str.strip(WHITESPACE)
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
    args = cli.parse(parser, argv)
    cli.print_result(validate_dataset(load_spec(args.spec), args.raw, args.output))


if __name__ == "__main__":
    main()
