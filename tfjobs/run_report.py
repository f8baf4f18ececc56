"""The run report: one self-contained HTML file per run, for a person to read.

``runs/<dataset>/<run>/report.html`` tells what the run did, from what it left on the
store, in six sections (each says so when the run did not get that far, and why):

========================  ==================================================================
``data``                  the delivery: rows, source and checksum; valid and quarantined
                          rows, the quarantine reasons and the first quarantined lines
``features``              each feature's profile (count, missing share, mean/std/quantiles or
                          the most frequent values), drawn against the production model's
                          training data, with its drift distance and threshold
``training``              the training curves, epochs, the model kind and its settings
``evaluation``            the test metrics of the candidate and of production's model side by
                          side, the change thresholds, the verdict and its reason; the
                          confusion matrix or the residual plot
``serving``               the published version, what production is (``production.json``,
                          ``models.config``), the served signature and an example request;
                          a scoring run shows its predictions here
``lineage``               the spec's fingerprint, the partition and the checksums of each
                          input, the code version, package versions and the parent model
========================  ==================================================================

Plots are PNGs drawn with matplotlib and embedded as ``data:`` URIs; the style sheet is
inline: the file opens anywhere, without a network. Only the standard library's
string templates and ``html.escape`` build it.

    python -m tfjobs.report --spec include/housing.yaml --store <store> --run 2026-11-25T000000 --html
"""

from __future__ import annotations

import base64
import datetime
import functools
import html
import importlib.metadata
import io
import json
import re
import subprocess
from pathlib import Path
from string import Template
from typing import Any

from tfjobs.spec import PipelineSpec
from tfjobs.storage.layout import Layout
from tfjobs.storage.store import join, read_json_if_exists, store_for

REPORT_FILE = "report.html"
SECTIONS = ("data", "features", "training", "evaluation", "serving", "lineage")
PACKAGES = ("tensorflow", "keras", "numpy", "pandas", "pyarrow", "apache-airflow", "matplotlib")
QUARANTINE_LINES = 10

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 1.5em 3em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-bottom: 0.3em; } nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { display: inline-block; padding: 0.3em 0.8em; border-radius: 4px; font-weight: 600; }
.good { background: #d8f3dc; color: #1b4332; } .bad { background: #ffd6d6; color: #7a1020; } .warn { background: #fff1c1; color: #6b4e00; }
.muted { color: #6e6e73; } pre { background: #f5f5f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
.features { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: 1em; }
.feature { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; } .feature.drifted { border-color: #c1121f; }
.feature table { font-size: 12px; } img { max-width: 100%; }
</style></head>
<body>
<h1>$title</h1>
<p class="muted">$subtitle</p>
<p>$headline</p>
<nav>$nav</nav>
$sections
<p class="muted">Written by tfjobs.run_report at $written.</p>
</body></html>
""")


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any, sign: str = "") -> str:
    """A number as people read it: 57,288 dollars, 0.9804 accuracy, 0.00015 log loss."""
    if isinstance(value, float):
        return f"{value:{sign},.0f}" if abs(value) >= 1000 else f"{value:{sign}.4g}"
    return esc(value)


def table(rows: list[tuple], header: tuple | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{fmt(c)}</td>' if isinstance(c, (int, float))
                                    else f"<td>{c if isinstance(c, Markup) else esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table>{head}{body}</table>"


class Markup(str):
    """Text that is already HTML (a link, a badge): :func:`table` does not escape it."""


def badge(text: str, tone: str) -> Markup:
    return Markup(f'<span class="verdict {tone}">{esc(text)}</span>')


def section(name: str, title: str, body: str) -> str:
    return f'<section id="{name}"><h2>{esc(title)}</h2>\n{body}\n</section>'


# -- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> str:
    """A figure as an ``<img>`` with a data: URI (closed afterwards)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72, bbox_inches="tight")
    plt.close(fig)
    return img(buffer.getvalue(), "plot")


def img(data: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def plot_numeric(name: str, current: dict, baseline: dict | None) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 2.2))
    for profile, label in ((current, "this delivery"), (baseline, "training data of production")):
        if profile and "histogram" in profile:
            edges, counts = profile["histogram"]["edges"], profile["histogram"]["counts"]
            shares = [c / max(sum(counts), 1) for c in counts]
            if profile is current:
                widths = [b - a for a, b in zip(edges, edges[1:])] or [1.0]
                ax.bar(edges[:-1], shares, width=widths, align="edge", label=label, color="#1f77b4", alpha=0.6)
            elif len(edges) == len(shares) + 1:
                ax.stairs(shares, edges, label=label, color="#333", linewidth=1.2)
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("share of rows", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return png(fig)


def plot_values(name: str, current: dict, baseline: dict | None, top: int = 8) -> str:
    from tfjobs.features.profiles import value_shares

    plt = _pyplot()
    now = value_shares(current)
    before = value_shares(baseline) if baseline else {}
    values = sorted(now.keys() | before.keys(), key=lambda v: -max(now.get(v, 0), before.get(v, 0)))[:top]
    labels = ["(missing)" if v is None else str(v)[:20] for v in values]
    fig, ax = plt.subplots(figsize=(4.4, 0.35 * len(values) + 0.9))
    positions = range(len(values))
    if before:
        ax.barh([p + 0.2 for p in positions], [before.get(v, 0) for v in values], height=0.4, color="#999",
                label="training data of production")
    ax.barh([p - 0.2 for p in positions], [now.get(v, 0) for v in values], height=0.4, color="#1f77b4",
            label="this delivery")
    ax.set_yticks(list(positions), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of rows", fontsize=8)
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return png(fig)


def plot_confusion(confusion: dict) -> str:
    plt = _pyplot()
    counts, classes = confusion["counts"], confusion["classes"]
    fig, ax = plt.subplots(figsize=(0.9 * len(classes) + 2, 0.8 * len(classes) + 1.5))
    ax.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(classes)), classes, fontsize=8, rotation=30)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test split)", fontsize=9)
    return png(fig)


def plot_residuals(residuals: dict) -> str:
    plt = _pyplot()
    predictions, labels = residuals["predictions"], residuals["labels"]
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    ax.scatter(predictions, [y - p for y, p in zip(labels, predictions)], s=4, alpha=0.4)
    ax.axhline(0, color="#c1121f", linewidth=1)
    ax.set_xlabel("prediction", fontsize=8)
    ax.set_ylabel("label - prediction", fontsize=8)
    ax.set_title(f"residuals of the first {len(labels)} test rows", fontsize=9)
    ax.tick_params(labelsize=7)
    return png(fig)


# -- what the run left on the store --------------------------------------------------------------------


class RunFiles:
    """The run's outputs on the store, read once each (None when the run did not write them)."""

    def __init__(self, spec: PipelineSpec, layout: Layout, predictions_uri: str = ""):
        from tfjobs.promote import MODELS_CONFIG_FILE, production

        self.spec, self.layout = spec, layout
        self.raw = read_json_if_exists(join(layout.raw, "manifest.json"))
        self.validated = read_json_if_exists(join(layout.validated, "report.json"))
        self.statistics = read_json_if_exists(join(layout.statistics, "statistics.json"))
        self.shards = read_json_if_exists(join(layout.shards, "manifest.json"))
        self.training = read_json_if_exists(join(layout.run_dir, "train", "training.json"))
        self.evaluation = read_json_if_exists(join(layout.run_dir, "evaluate", "metrics.json"))
        self.production = production(layout.serving)
        config_uri = join(layout.serving, MODELS_CONFIG_FILE)
        store = store_for(config_uri)
        self.models_config = store.read_bytes(config_uri).decode() if store.exists(config_uri) else None
        self.predictions_uri = predictions_uri
        self.predictions = read_json_if_exists(join(predictions_uri, "manifest.json")) if predictions_uri else None

    @functools.cached_property
    def version(self) -> tuple[int, dict] | None:
        """The version this run published (its model's weights), with its ``shardline.json``."""
        from tfjobs.export import METADATA_FILE, published_versions

        weights = (self.evaluation or {}).get("weights_sha256")
        if not weights:
            return None
        for version, uri in sorted(published_versions(self.layout.serving).items(), reverse=True):
            metadata = read_json_if_exists(join(uri, METADATA_FILE)) or {}
            if metadata.get("weights_sha256") == weights:
                return version, metadata
        return None

    @functools.cached_property
    def baseline(self) -> dict | None:
        """The profiles of the production model's training data this delivery was compared with."""
        info = ((self.statistics or {}).get("drift") or {}).get("baseline") or {}
        return read_json_if_exists(info["statistics"]) if info.get("statistics") else None

    def bytes_if_exists(self, uri: str) -> bytes | None:
        store = store_for(uri)
        return store.read_bytes(uri) if store.exists(uri) else None


def not_reached(files: RunFiles, step: str) -> str:
    """Why a section is empty: the run stopped earlier (drift, quarantine) or has not got there yet."""
    drift = ((files.statistics or {}).get("drift") or {})
    if drift.get("drifted") and drift.get("action") == "stop":
        why = f"the run stopped at the statistics step: {drift.get('message', '')}"
    elif files.validated is None:
        why = "the run has no validated data (the fetch or validate step did not finish)"
    else:
        why = f"the run has no {step} output (it stopped before, failed, or this run does not {step})"
    return f'<p class="warn verdict">Not reached: {esc(why)}.</p>'


def data_section(files: RunFiles) -> str:
    parts = []
    if files.raw:
        parts.append(table([("source", files.raw["source"]), ("rows delivered", files.raw["rows"]),
                            ("SHA-256", files.raw["sha256"]), ("file", join(files.layout.raw, files.raw["file"]))]))
    report = files.validated
    if report is None:
        return "".join(parts) + not_reached(files, "validate")
    share = report["rows_quarantined"] / max(report["rows_in"], 1)
    parts.append(table([("rows in", report["rows_in"]), ("valid", report["rows_valid"]),
                        ("quarantined", report["rows_quarantined"]), ("quarantined share", f"{share:.2%}"),
                        ("label", "required" if report.get("label_required", True) else "none (a delivery to score)"),
                        ("ignored columns", ", ".join(report.get("ignored_columns", [])) or "none")]))
    if report["reasons"]:
        parts.append("<h3>Quarantine reasons</h3>" + table(sorted(report["reasons"].items(), key=lambda kv: -kv[1]),
                                                           ("reason", "rows")))
        quarantine = files.bytes_if_exists(join(files.layout.validated, report["quarantine_file"]))
        if quarantine:
            lines = quarantine.decode(errors="replace").splitlines()[: QUARANTINE_LINES + 1]
            parts.append(f"<h3>First quarantined rows</h3><pre>{esc(chr(10).join(lines))}</pre>")
    else:
        parts.append("<p>No row was quarantined.</p>")
    if report.get("missing_values"):
        parts.append("<h3>Missing values (imputed or quarantined by each feature's policy)</h3>"
                     + table(sorted(report["missing_values"].items()), ("column", "rows")))
    return "".join(parts)


def features_section(files: RunFiles) -> str:
    statistics = files.statistics
    if statistics is None:
        return not_reached(files, "statistics")
    drift = statistics["drift"]
    tone = "bad" if drift["drifted"] else "good"
    if not drift.get("baseline") or "statistics_sha256" not in (drift.get("baseline") or {}):
        tone = "warn"
    parts = [f"<p>{badge(drift['message'], tone)}</p>",
             f"<p class=\"muted\">Drift action: {esc(drift['action'])}. {statistics['rows']:,} valid rows profiled."
             + (f" Not profiled (their kinds have no profile): {esc(', '.join(statistics['skipped']))}."
                if statistics["skipped"] else "") + "</p>"]
    baseline = (files.baseline or {}).get("features", {})
    cards = []
    for name, profile in statistics["features"].items():
        entry = drift["features"].get(name)
        rows = [("kind", profile["kind"]), ("rows", profile["count"]), ("missing", f"{profile['missing_share']:.2%}")]
        first = ("mean", "std", "min", "median", "max")
        rows += [(key, profile[key]) for key in first if key in profile]
        rows += [(key, value) for key, value in sorted(profile.items()) if isinstance(value, (int, float))
                 and key not in ("count", "missing", "missing_share", *first)]
        if entry:
            rows.append((f"drift ({entry['measure'].replace('_', '-')})",
                         Markup(f"{entry['distance']:.4f} (threshold {entry['threshold']:g}) "
                                + badge("drifted" if entry["drifted"] else "ok",
                                        "bad" if entry["drifted"] else "good"))))
            rows.append(("what moved", entry["detail"]))
        plot = ""
        if "histogram" in profile:
            plot = plot_numeric(name, profile, baseline.get(name))
        elif "top_values" in profile:
            plot = plot_values(name, profile, baseline.get(name))
        drifted = " drifted" if entry and entry["drifted"] else ""
        cards.append(f'<div class="feature{drifted}" id="feature-{esc(name)}"><h3>{esc(name)}</h3>{plot}'
                     f"{table(rows)}</div>")
    return "".join(parts) + f'<div class="features">{"".join(cards)}</div>'


def training_section(files: RunFiles) -> str:
    training = files.training
    if training is None:
        return not_reached(files, "train")
    train_dir = join(files.layout.run_dir, "train")
    curve = files.bytes_if_exists(join(train_dir, "training_curve.png"))
    settings = training.get("settings", {})
    rows = [("model", training["model_kind"]), ("loop", training.get("loop", "fit")),
            ("epochs run", training["epochs_run"]), ("best epoch", training["best_epoch"]),
            ("backend", training.get("backend", "")),
            ("settings", ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))]
    rows += [(f"best epoch's {k}", v) for k, v in sorted(training.get("metrics", {}).items())]
    return (img(curve, "training curves") if curve else "<p>No training curve was drawn.</p>") + table(rows) + \
        f'<p class="muted">TensorBoard: <code>tensorboard --logdir {esc(join(train_dir, "tensorboard"))}</code></p>'


def evaluation_section(files: RunFiles) -> str:
    evaluation = files.evaluation
    if evaluation is None:
        return not_reached(files, "evaluate")
    verdict = evaluation.get("verdict", "promote" if evaluation["blessed"] else "not blessed")
    tone = "good" if verdict == "promote" else "warn" if "forced" in verdict else "bad"
    parts = [f"<p>{badge(verdict, tone)} {esc(evaluation.get('reason', ''))}</p>"]
    champion = evaluation.get("champion") or {}
    theirs = champion.get("metrics") or {}
    comparison = evaluation.get("comparison") or {}
    bounds = evaluation.get("thresholds", {})
    rows = []
    for name, value in evaluation["metrics"].items():
        if not isinstance(value, float):
            continue
        limit = []
        if name in bounds.get("min", {}):
            limit.append(f">= {bounds['min'][name]:g}")
        if name in bounds.get("max", {}):
            limit.append(f"<= {bounds['max'][name]:g}")
        compared = comparison.get(name)
        at_least = compared and compared["direction"].startswith("higher")
        change = (Markup(f"{fmt(compared['change'], '+')} (allowed {'>=' if at_least else '<='} "
                         f"{fmt(float(compared['allowed']), '+')}) "
                         + badge("ok" if compared["passed"] else "fails", "good" if compared["passed"] else "bad"))
                  if compared else (fmt(value - theirs[name], "+") if name in theirs else ""))
        rows.append((name, value, theirs.get(name, ""), change, " and ".join(limit)))
    who = (f"production version {champion['version']} (run {champion.get('run') or '?'})" if champion
           else "no model in production")
    parts.append(f"<p>On {evaluation['records']:,} test rows: this run's model against {esc(who)}"
                 + (f" &mdash; {esc(champion['problem'])}" if champion.get("problem") else "") + ".</p>")
    parts.append(table(rows, ("metric", "this run's model", "production's model", "change", "absolute bound")))
    if evaluation.get("forced"):
        forced = evaluation["forced"]
        parts.append(f"<p>{badge('forced', 'warn')} by {esc(forced['by'] or 'unknown')} at {esc(forced['at'])}"
                     f" (run {esc(forced.get('run_id', ''))})</p>")
    if "confusion_matrix" in evaluation["metrics"]:
        parts.append(plot_confusion(evaluation["metrics"]["confusion_matrix"]))
    elif evaluation.get("residuals"):
        parts.append(plot_residuals(evaluation["residuals"]))
    return "".join(parts)


def serving_section(files: RunFiles) -> str:
    parts = []
    if files.predictions:
        p = files.predictions
        parts.append("<h3>Predictions</h3>" + table([
            ("rows scored", p["rows"]), ("rows quarantined (not scored)", p["rows_quarantined"]),
            ("model version", p["model_version"]), ("file", join(files.predictions_uri, p["file"])),
            ("columns", ", ".join(p["columns"])), ("SHA-256", p["sha256"])]))
    published = files.version
    if published:
        version, metadata = published
        parts.append(table([("published version", version), ("directory", join(files.layout.serving, str(version))),
                            ("skew check, max |diff|", metadata.get("max_skew", "")),
                            ("training statistics kept", "yes" if metadata.get("statistics") else "no")]))
    elif files.evaluation is not None:
        parts.append(f"<p>{badge('not published', 'warn')} this run's model was not exported "
                     f"({esc(files.evaluation.get('verdict', ''))}).</p>")
    pointer = files.production
    if pointer:
        mine = published is not None and pointer["version"] == published[0]
        parts.append(f"<h3>Production</h3><p>{badge(('this run' if mine else 'version') + ' ' + str(pointer['version']), 'good' if mine else 'warn')}"
                     f" promoted {esc(pointer['promoted_at'])} by {esc(pointer['promoted_by'])}: {esc(pointer['reason'])}</p>")
        history = [(h["version"], h.get("run", ""), h.get("promoted_at", ""), h.get("reason", ""))
                   for h in pointer.get("history", [])[:5]]
        if history:
            parts.append("<p>Earlier production versions (newest first):</p>"
                         + table(history, ("version", "run", "promoted at", "reason")))
        if files.models_config:
            parts.append(f"<p>TF Serving config (<code>models.config</code>):</p><pre>{esc(files.models_config)}</pre>")
    elif not files.predictions:
        parts.append("<p>No model is in production yet.</p>")
    metadata = published[1] if published else None
    if metadata is None and pointer:
        from tfjobs.export import METADATA_FILE

        metadata = read_json_if_exists(join(files.layout.serving, str(pointer["version"]), METADATA_FILE))
    if metadata and metadata.get("signature"):
        signature = metadata["signature"]
        parts.append("<h3>Served signature (<code>serving_default</code>)</h3>" + table(
            [(name, i["kind"], i["dtype"], i["send"]) for name, i in signature["inputs"].items()],
            ("input", "kind", "dtype", "how to send it")) + table(
            [(name, dtype) for name, dtype in signature["outputs"].items()], ("output", "dtype")))
        examples = (files.evaluation or {}).get("examples") or []
        if examples:
            name = files.spec.model_name
            request = json.dumps({"instances": examples}, indent=1)
            parts.append("<p>An example request (test rows), to TF Serving's REST API:</p><pre>"
                         + esc(f"curl -X POST http://localhost:8501/v1/models/{name}/labels/stable:predict \\\n"
                               f"  -d '{request}'") + "</pre>"
                         + f"<p class=\"muted\">or <code>python -m tfjobs.predict --serving "
                         f"{esc(files.layout.serving)} --instances request.json</code></p>")
    return "".join(parts) or not_reached(files, "export")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The project's git commit (with ``-dirty`` for local changes), or "unknown" outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return described or "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def lineage_section(files: RunFiles) -> str:
    evaluation = files.evaluation or {}
    inputs = evaluation.get("inputs", {})
    champion = evaluation.get("champion") or {}
    rows = [("spec", f"{files.spec.name}: {files.spec.fingerprint()}"),
            ("partition", files.layout.partition), ("run", files.layout.run)]
    if files.raw:
        rows.append(("raw data SHA-256", files.raw["sha256"]))
    if files.validated:
        rows.append(("validated data SHA-256", files.validated["data_sha256"]))
    if files.statistics:
        rows.append(("statistics", join(files.layout.statistics, "statistics.json")))
    for key, label in (("shards_manifest_sha256", "shard manifest SHA-256"), ("state_sha256", "preprocessing state "
                       "SHA-256"), ("model_sha256", "trained model SHA-256")):
        if key in inputs:
            rows.append((label, inputs[key]))
    if evaluation.get("weights_sha256"):
        rows.append(("model weights SHA-256", evaluation["weights_sha256"]))
    rows.append(("parent model (production when evaluated)",
                 f"version {champion['version']} (run {champion.get('run') or '?'})" if champion else "none"))
    if files.predictions:
        rows.append(("scored with version", files.predictions["model_version"]))
    rows.append(("code version", code_version()))
    rows.append(("packages", ", ".join(f"{k} {v}" for k, v in package_versions().items())))
    return table(rows)


def render(spec: PipelineSpec, layout: Layout, predictions_uri: str = "") -> str:
    """The report's HTML for a run (``predictions_uri``: where a scoring run wrote its predictions)."""
    files = RunFiles(spec, layout, predictions_uri)
    titles = {"data": "Data", "features": "Features: statistics and drift", "training": "Training",
              "evaluation": "Evaluation: this run's model against production's", "serving": "Serving",
              "lineage": "Lineage"}
    builders = {"data": data_section, "features": features_section, "training": training_section,
                "evaluation": evaluation_section, "serving": serving_section, "lineage": lineage_section}
    if files.predictions is not None:  # a scoring run trains nothing
        titles.update(training="Training (a scoring run does not train)", evaluation="Evaluation (not in a scoring run)",
                      serving="Scoring")
    body = "\n".join(section(name, titles[name], builders[name](files)) for name in SECTIONS)
    evaluation = files.evaluation or {}
    drift = (files.statistics or {}).get("drift") or {}
    if evaluation:
        verdict = evaluation.get("verdict", "")
        headline = badge(verdict, "good" if verdict == "promote" else "warn" if "forced" in verdict else "bad") + \
            " " + esc(evaluation.get("reason", ""))
    elif drift.get("drifted") and drift.get("action") == "stop":
        headline = badge("stopped: drift", "bad") + " " + esc(drift.get("message", ""))
    elif files.predictions:
        headline = badge(f"{files.predictions['rows']:,} rows scored", "good") + \
            f" with version {files.predictions['model_version']}"
    else:
        headline = badge("incomplete", "warn") + " the run has not evaluated a model"
    return PAGE.substitute(
        title=esc(f"Shardline run report: {spec.name}, run {layout.run}"),
        subtitle=esc(f"{layout.dataset}, partition {layout.partition}; store {layout.root}"),
        headline=headline,
        nav="".join(f'<a href="#{name}">{esc(titles[name].split(":")[0])}</a>' for name in SECTIONS),
        sections=body,
        written=esc(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()),
    )


def write_run_report(spec: PipelineSpec, layout: Layout, predictions_uri: str = "") -> str:
    """Write ``runs/<dataset>/<run>/report.html`` (unless only its time would change); its URI."""
    uri = join(layout.run_dir, REPORT_FILE)
    store = store_for(uri)
    page = render(spec, layout, predictions_uri)
    if not (store.exists(uri) and _timeless(store.read_bytes(uri).decode()) == _timeless(page)):
        store.write_bytes(uri, page.encode())
    return uri


def _timeless(page: str) -> str:
    return re.sub(r"Written by tfjobs\.run_report at [^<]*", "", page)
