"""Profile a partition's validated rows feature by feature, and check them for drift against production's data.

Reads ``validated/<dataset>/<partition>/data.parquet`` one row group at a time
(memory does not grow with the partition; no TensorFlow) and asks each feature's kind
for its profile (:meth:`tfjobs.features.Feature.profile`: count and missing share for
all; mean, std, quantiles and a histogram for numbers; the most frequent values and
their shares for categories; kinds without a profile are listed as skipped). Writes
``statistics/<dataset>/<partition>/statistics.json``.

Then it compares the profiles with those of the data the production model was trained
on (``statistics.json`` in the production version's directory, which the export step
copies there; :mod:`tfjobs.promote` says which version is production). Each kind
measures its own distance (:meth:`~tfjobs.features.Feature.drift`: Jensen-Shannon
divergence for numbers, L-infinity for categories), and a feature whose distance is
above the spec's threshold (``drift.threshold``, or ``drift.features.<name>``) has
drifted. With ``drift.action: stop`` a drifted delivery fails the step (before
training in the training DAG, before scoring in the scoring DAG, which makes the
comparison TFDV calls skew: serving data against training data); with ``warn`` it is
logged and recorded. Without a production model (a first run) nothing is compared.

    python -m tfjobs.statistics --spec include/housing.yaml --validated <store>/validated/housing/2026-11-25 \\
        --output <store>/statistics/housing/2026-11-25 --serving <store>/serving/housing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass

from tfjobs import cli
from tfjobs.spec import PipelineSpec, load_spec
from tfjobs.storage.store import join, local_copy, read_json, read_json_if_exists, store_for, write_json

log = logging.getLogger(__name__)

STATISTICS_FILE = "statistics.json"
BATCH_ROWS = 65_536


class DriftError(ValueError):
    """A delivery drifted beyond the spec's thresholds, and the spec's ``drift.action`` is ``stop``."""


@dataclass(frozen=True)
class StatisticsResult:
    statistics_uri: str
    rows: int
    profiled: list[str]
    baseline: str  # what the delivery was compared with; "" when nothing was
    drifted: dict[str, float]  # feature -> distance, for those above their threshold
    message: str
    rewritten: bool


def profile_partition(spec: PipelineSpec, parquet_path) -> tuple[int, dict[str, dict], list[str]]:
    """(rows, {feature: profile result with its kind}, features whose kind has no profile) of a validated Parquet."""
    import pyarrow.parquet as pq

    profiles = {f.name: f.profile() for f in spec.features}
    skipped = [name for name, profile in profiles.items() if profile is None]
    profiles = {name: profile for name, profile in profiles.items() if profile is not None}
    rows = 0
    parquet = pq.ParquetFile(parquet_path)
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(profiles) or None):
        rows += batch.num_rows
        for name, profile in profiles.items():
            profile.update(batch.column(name).to_numpy(zero_copy_only=False))
    if not profiles:
        rows = parquet.metadata.num_rows
    return rows, {name: {"kind": spec.feature(name).kind, **p.result()} for name, p in profiles.items()}, skipped


def compare(spec: PipelineSpec, baseline: dict, current: dict) -> dict[str, dict]:
    """Each profiled feature's drift from ``baseline`` (both ``features`` maps of a statistics file)."""
    out = {}
    for feature in spec.features:
        if feature.name not in current or feature.name not in baseline:
            continue
        if baseline[feature.name]["kind"] != feature.kind:
            continue  # the spec changed the feature's kind since production was trained: not comparable
        drift = feature.drift(baseline[feature.name], current[feature.name])
        if drift is None:
            continue
        threshold = spec.drift.threshold_of(feature.name)
        out[feature.name] = {"measure": drift.measure, "distance": drift.distance, "threshold": threshold,
                             "drifted": drift.distance > threshold, "detail": drift.detail}
    return out


def production_statistics(serving_uri: str) -> tuple[dict | None, dict]:
    """The training statistics of the production model, and what they are (version, run, partition)."""
    from tfjobs.promote import champion

    current = champion(serving_uri) if serving_uri else None
    if current is None:
        return None, {}
    uri = join(current.uri, STATISTICS_FILE)
    store = store_for(uri)
    info = {"version": current.version, "run": current.run, "statistics": uri}
    if not store.exists(uri):
        return None, {**info, "missing": "published without training statistics (before drift checks)"}
    data = store.read_bytes(uri)
    statistics = json.loads(data)
    return statistics, {**info, "partition": statistics.get("partition", ""),
                        "statistics_sha256": hashlib.sha256(data).hexdigest()}


def compute_statistics(spec: PipelineSpec, validated_uri: str, output_uri: str, serving_uri: str = "",
                       partition: str = "") -> StatisticsResult:
    report_uri = join(validated_uri, "report.json")
    if not store_for(report_uri).exists(report_uri):
        raise FileNotFoundError(f"No validated data at {validated_uri} (no report.json): run the validate step first")
    report = read_json(report_uri)
    baseline, baseline_info = production_statistics(serving_uri)
    fingerprint = hashlib.sha256(json.dumps(
        [report["data_sha256"], spec.fingerprint(), baseline_info.get("statistics_sha256")]).encode()).hexdigest()
    statistics_uri = join(output_uri, STATISTICS_FILE)
    previous = read_json_if_exists(statistics_uri)
    if previous and previous.get("fingerprint") == fingerprint:
        log.info("Statistics at %s are up to date; nothing rewritten", statistics_uri)
        return _finish(spec, statistics_uri, previous, rewritten=False)

    with local_copy(join(validated_uri, report["data_file"])) as path:
        rows, profiles, skipped = profile_partition(spec, path)
    drift = {"baseline": baseline_info or None, "action": spec.drift.action, "features": {}, "drifted": []}
    if baseline is not None:
        drift["features"] = compare(spec, baseline["features"], profiles)
        drift["drifted"] = [name for name, entry in drift["features"].items() if entry["drifted"]]
    statistics = {
        "dataset": spec.name,
        "partition": partition or validated_uri.rstrip("/").rsplit("/", 1)[-1],
        "spec": spec.fingerprint(),
        "data_sha256": report["data_sha256"],
        "rows": rows,
        "features": profiles,
        "skipped": skipped,
        "drift": drift,
        "fingerprint": fingerprint,
    }
    drift["message"] = drift_message(statistics)
    write_json(statistics_uri, statistics)
    log.info("Profiled %d features of %d rows at %s", len(profiles), rows, statistics_uri)
    return _finish(spec, statistics_uri, statistics, rewritten=True)


def drift_message(statistics: dict) -> str:
    drift = statistics["drift"]
    baseline = drift["baseline"]
    if not baseline:
        return "No production model: nothing to compare with"
    if "missing" in baseline:
        return f"Production version {baseline['version']} was {baseline['missing']}: nothing to compare with"
    against = f"the data of production version {baseline['version']} (partition {baseline.get('partition', '?')})"
    if not drift["drifted"]:
        return f"No feature drifted against {against}"
    moved = "; ".join(
        f"{name}: {entry['measure'].replace('_', '-')} {entry['distance']:.3f} > {entry['threshold']:g} ({entry['detail']})"
        for name, entry in drift["features"].items() if entry["drifted"])
    return f"{len(drift['drifted'])} feature(s) drifted against {against}: {moved}"


def _finish(spec: PipelineSpec, statistics_uri: str, statistics: dict, rewritten: bool) -> StatisticsResult:
    drift = statistics["drift"]
    baseline = drift["baseline"] or {}
    result = StatisticsResult(
        statistics_uri=statistics_uri,
        rows=statistics["rows"],
        profiled=sorted(statistics["features"]),
        baseline=f"production version {baseline['version']}" if "statistics_sha256" in baseline else "",
        drifted={name: drift["features"][name]["distance"] for name in drift["drifted"]},
        message=drift["message"],
        rewritten=rewritten,
    )
    if result.drifted:
        if spec.drift.action == "stop":
            raise DriftError(f"{result.message}. The spec's drift.action is stop: this delivery is not used. "
                             f"Profiles in {statistics_uri}.")
        log.warning("%s (drift.action: warn, so the run goes on)", result.message)
    else:
        log.info("%s", result.message)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.statistics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--validated", required=True, help="validated data prefix URI (the validate step's output)")
    parser.add_argument("--output", required=True, help="output prefix URI")
    parser.add_argument("--serving", default="", help="the model's serving prefix, to compare with production's data")
    parser.add_argument("--partition", default="", help="the partition's name (default: the last part of --validated)")
    args = cli.parse(parser, argv)
    cli.print_result(compute_statistics(load_spec(args.spec), args.validated, args.output, args.serving,
                                        args.partition))


if __name__ == "__main__":
    main()
