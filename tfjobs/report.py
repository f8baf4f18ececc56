"""Summarize what a pipeline left on the store: each artifact, its numbers, the serving model.

    python -m tfjobs.report --spec include/penguins.yaml --store .demo/store [--instances request.json]

Reads the newest partition and run (or the ones given) and the production version; with
``--instances`` it also loads the production model from the store and predicts. With
``--html`` it (re)writes the run's HTML report (:mod:`tfjobs.run_report`) and prints where.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tfjobs import cli
from tfjobs.storage.layout import Layout
from tfjobs.run_report import REPORT_FILE
from tfjobs.spec import load_spec
from tfjobs.storage.store import join, read_json_if_exists, store_for
from tfjobs.tune import tuning_lines


def _newest_child(prefix: str) -> str | None:
    """The greatest name directly under ``prefix`` (ISO dates and run keys sort by time)."""
    base = prefix.rstrip("/") + "/"
    names = {uri[len(base) :].split("/", 1)[0] for uri in store_for(prefix).list(prefix)}
    return max(names) if names else None


def summarize(spec_path: str, store_uri: str, partition: str = "", run: str = "") -> list[str]:
    from tfjobs.export import published_versions
    from tfjobs.promote import champion

    spec = load_spec(spec_path)
    partition = partition or _newest_child(join(store_uri, "shards", spec.name)) or "?"
    run = run or _newest_child(join(store_uri, "runs", spec.name)) or "?"
    layout = Layout(store_uri, spec.name, partition, run=run, model_name=spec.model_name)
    lines = [f"Shardline pipeline {spec.name!r}, partition {partition}, run {run}"]

    def line(label: str, uri: str, detail: str) -> None:
        lines.append(f"  {label:<14} {uri}\n  {'':<14} {detail}")

    raw = read_json_if_exists(join(layout.raw, "manifest.json"))
    if raw:
        line("raw data", join(layout.raw, raw["file"]), f"{raw['rows']} rows from {raw['source']}")
    report = read_json_if_exists(join(layout.validated, "report.json"))
    if report:
        line("validated", join(layout.validated, report["data_file"]),
             f"{report['rows_valid']} valid, {report['rows_quarantined']} quarantined"
             + (f" {report['reasons']}" if report["reasons"] else ""))
    manifest = read_json_if_exists(join(layout.shards, "manifest.json"))
    if manifest:
        counts = ", ".join(f"{s} {v['records']}" for s, v in manifest["splits"].items())
        shards = sum(len(v["shards"]) for v in manifest["splits"].values())
        line("shards", layout.shards, f"{shards} GZIP TFRecord shards; records: {counts}")
    state = read_json_if_exists(join(layout.preprocessing, "state.json"))
    if state:
        from tfjobs.features import feature_from_state

        vocab = ", ".join(f"{n} {len(f['vocabulary'])}" for n, f in state["features"].items() if "vocabulary" in f)
        details = [f"vocabulary sizes: {vocab}"] if vocab else []
        details += [f"{name}: {summary}" for name, entry in state["features"].items()
                    if (summary := feature_from_state(name, entry).state_summary(entry))]
        line("preprocessing", join(layout.preprocessing, "state.json"),
             "; ".join(details) or f"{len(state['features'])} features")
    training = read_json_if_exists(join(layout.run_dir, "train", "training.json"))
    if training:
        train_dir = join(layout.run_dir, "train")
        line("model", join(train_dir, training["model_file"]),
             f"{training['model_kind']}, {training['epochs_run']} epochs (best {training['best_epoch']})")
        line("curves", join(train_dir, "training_curve.png"), f"tensorboard --logdir {join(train_dir, 'tensorboard')}")
    lines += tuning_lines(layout.run_dir)
    evaluation = read_json_if_exists(join(layout.run_dir, "evaluate", "metrics.json"))
    if evaluation:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in evaluation["metrics"].items() if isinstance(v, float))
        verdict = evaluation.get("verdict") or ("blessed" if evaluation["blessed"] else "NOT blessed")
        if verdict != "promote":
            verdict += ": " + (evaluation.get("reason") or "; ".join(evaluation["failures"]))
        line("test metrics", join(layout.run_dir, "evaluate", "metrics.json"),
             f"{metrics} on {evaluation['records']} test rows ({verdict})")
    versions = published_versions(layout.serving)
    production = champion(layout.serving) if versions else None
    if production is not None:
        pointer = read_json_if_exists(join(layout.serving, "production.json")) or {}
        since = f"; production since {pointer['promoted_at']}: {pointer['reason']}" if pointer else ""
        line("serving", production.uri,
             f"SavedModel version {production.version} of {len(versions)} (production, from run {production.run})"
             f"; skew check max |diff| {production.metadata.get('max_skew')}{since}")
    statistics = read_json_if_exists(join(layout.statistics, "statistics.json"))
    if statistics:
        line("statistics", join(layout.statistics, "statistics.json"), statistics["drift"]["message"])
    report = join(layout.run_dir, REPORT_FILE)
    if store_for(report).exists(report):
        local = store_for(report).local_path(report)
        line("run report", report, f"one HTML file, no network needed: {local.resolve().as_uri() if local else report}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--store", required=True, help="object store root URI")
    parser.add_argument("--partition", default="", help="partition to show (default: the newest)")
    parser.add_argument("--run", default="", help="run to show (default: the newest)")
    parser.add_argument("--instances", default="", help="JSON rows to predict with the production version")
    parser.add_argument("--html", action="store_true", help="write the run's HTML report first")
    args = cli.parse(parser, argv)
    if args.html:
        from tfjobs.run_report import write_run_report

        spec = load_spec(args.spec)
        partition = args.partition or _newest_child(join(args.store, "shards", spec.name)) or "?"
        run = args.run or _newest_child(join(args.store, "runs", spec.name)) or "?"
        write_run_report(spec, Layout(args.store, spec.name, partition, run=run, model_name=spec.model_name))
    print("\n".join(summarize(args.spec, args.store, args.partition, args.run)))
    if args.instances:
        from tfjobs.predict import predict

        spec = load_spec(args.spec)
        instances = json.loads(Path(args.instances).read_text())
        instances = instances["instances"] if isinstance(instances, dict) else instances
        result = predict(join(args.store, "serving", spec.model_name), instances)
        print(f"\nPrediction by the production model (version {result['version']}, loaded from the store):")
        for row, prediction in zip(instances, result["predictions"]):
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            answer = {k: v for k, v in prediction.items() if k != "class_ids"}
            if "probabilities" in answer:
                answer["probabilities"] = [round(p, 3) for p in answer["probabilities"]]
            print(f"  {json.dumps(shown)}\n    -> {json.dumps(answer)}")


if __name__ == "__main__":
    main()
