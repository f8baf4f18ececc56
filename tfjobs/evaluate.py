"""Evaluate the model that would be exported on the test split, and bless it or not.

The model evaluated is the inference model: the adapted preprocessing plus the
trained model, fed raw test rows, exactly what the export step writes. A run binds
its inputs: the state is the run's copy (``train/state.json``), and evaluate refuses
shards or a state other than those the model was trained on (another run of the same
partition may have rewritten them); ``metrics.json`` records the SHA-256 of the model,
the state and the shard manifest it blessed, which the export step checks. Metrics
are in label units (class accuracy; dollars for a price).

Challenger against champion, as TFX's Evaluator does with a baseline model: the model
in production (:mod:`tfjobs.promote`; the newest serving version before anything was
promoted) is scored on the same test rows in the same pass, through its own
SavedModel's ``serving_default``, so the comparison needs nothing but the store. The
candidate is blessed when every absolute bound of the spec's ``evaluation`` holds and,
when there is a champion, every ``evaluation.change`` threshold: the change of a metric
(candidate - champion) in the metric's direction, ``{accuracy: -0.01}`` (may lose
0.01), ``{rmse: +500}`` (may grow by 500). A first run is judged by the absolute bounds
alone. ``metrics.json`` holds both models' metrics, each comparison, the verdict and
its reason. A forced promotion (``--force-by``, the DAG's *Force promotion* Param)
blesses a candidate that fails the change thresholds, recorded as forced with who and
when; it cannot pass the absolute bounds, which are the spec's to change. The export
step publishes only a blessed model.

    python -m tfjobs.evaluate --spec include/penguins.yaml --model <run>/train/training_model.keras \\
        --state <...>/state.json --shards <...>/manifest.json --output <store>/runs/penguins/<run>/evaluate
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from tfjobs import cli
from tfjobs.promote import now_text
from tfjobs.spec import PipelineSpec, load_spec
from tfjobs.storage.store import join, local_copy, read_json, read_json_if_exists, store_for, write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
BATCH_SIZE = 1024


class InputMismatchError(ValueError):
    """A model is paired with inputs (state, shards) other than those it was trained or blessed with."""


def input_hashes(model_uri: str, state_uri: str, shards_manifest_uri: str) -> dict[str, str]:
    """The SHA-256 of what a blessing binds together: the model file, its state, the shard manifest."""
    return {
        f"{name}_sha256": hashlib.sha256(store_for(uri).read_bytes(uri)).hexdigest()
        for name, uri in (("model", model_uri), ("state", state_uri), ("shards_manifest", shards_manifest_uri))
    }


def check_inputs(expected: dict[str, str], actual: dict[str, str], uris: dict[str, str], what: str) -> None:
    """Raise :class:`InputMismatchError` naming every input whose hash differs from ``expected``."""
    mismatched = [f"the {name.replace('_', ' ')} at {uris[name]} has SHA-256 {actual[name + '_sha256'][:12]}..., "
                  f"{what} {expected[name + '_sha256'][:12]}..."
                  for name in uris if name + "_sha256" in expected
                  and expected[name + "_sha256"] != actual[name + "_sha256"]]
    if mismatched:
        raise InputMismatchError(
            "; ".join(mismatched) + ". Another run of this partition (a backfill, a re-trigger with another "
            "source_uri, a spec edit) has rewritten them: re-run the whole date, train included."
        )


#: Metrics that are better higher (the others, rmse, mae and log_loss, are better lower).
HIGHER_IS_BETTER = ("accuracy", "r2", "precision_", "recall_")
#: Raw test rows kept in ``metrics.json`` as examples of a request; (label, prediction) pairs kept for a residual plot.
EXAMPLE_ROWS = 2
RESIDUAL_SAMPLE = 2000


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_IS_BETTER)


@dataclass(frozen=True)
class Forced:
    """A promotion forced past the change thresholds: who asked for it, when, in which run."""

    by: str
    at: str
    run_id: str = ""


@dataclass(frozen=True)
class EvaluateResult:
    metrics_uri: str
    metrics: dict[str, float]
    blessed: bool
    failures: list[str]
    rewritten: bool
    verdict: str = ""
    reason: str = ""
    champion_version: int | None = None
    champion_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    forced: bool = False


def load_inference_model(model_uri: str, state_uri: str):
    """The trained model wrapped with its preprocessing: raw features in, label units out."""
    import keras

    from tfjobs.features.preprocessing import build_inference_model

    with local_copy(model_uri) as path:
        # safe_mode: a model file from the store cannot run code (a Lambda layer's bytecode) when it loads.
        training_model = keras.saving.load_model(path, safe_mode=True)
    return training_model, build_inference_model(read_json(state_uri), training_model)


class SplitMetrics:
    """The task's test metrics, accumulated batch by batch: memory does not grow with the split.

    Classification: accuracy, log loss, and per class ``precision_<class>`` and ``recall_<class>``
    (flat names, so that the spec's bounds can name them: ``min: {recall_spam: 0.85}``), plus the
    confusion matrix. Regression: RMSE, MAE and R² (its label variance merged batch by batch).
    """

    def __init__(self, spec: PipelineSpec):
        self.spec = spec
        self.classes = list(spec.label.classes)
        self.records = 0
        if spec.label.task == "classification":
            self.confusion = np.zeros((len(self.classes), len(self.classes)), np.int64)
            self.log_loss_sum = 0.0
        else:
            from tfjobs.features.base import RunningMoments

            self.squared_error_sum = self.absolute_error_sum = 0.0
            self.labels = RunningMoments()

    def update(self, labels: np.ndarray, predictions: np.ndarray) -> None:
        self.records += len(labels)
        if self.spec.label.task == "classification":
            lookup = {c.encode(): i for i, c in enumerate(self.classes)}
            truth = np.array([lookup[v] for v in labels], np.int64)
            predicted = predictions.argmax(axis=1)
            np.add.at(self.confusion, (truth, predicted), 1)
            probability_of_truth = np.clip(predictions[np.arange(len(truth)), truth], 1e-7, 1.0)
            self.log_loss_sum += float(-np.log(probability_of_truth).sum())
        else:
            errors = predictions.reshape(-1).astype(np.float64) - labels.astype(np.float64)
            self.squared_error_sum += float((errors**2).sum())
            self.absolute_error_sum += float(np.abs(errors).sum())
            self.labels.update(labels)

    def result(self) -> dict:
        if not self.records:
            raise ValueError("The test split has no records: nothing to evaluate")
        if self.spec.label.task == "classification":
            confusion = self.confusion
            metrics = {
                "accuracy": float(np.trace(confusion) / self.records),
                "log_loss": self.log_loss_sum / self.records,
            }
            for i, name in enumerate(self.classes):
                metrics[f"precision_{name}"] = float(confusion[i, i] / max(confusion[:, i].sum(), 1))
                metrics[f"recall_{name}"] = float(confusion[i, i] / max(confusion[i].sum(), 1))
            metrics["confusion_matrix"] = {"classes": self.classes, "rows_are": "truth", "counts": confusion.tolist()}
            return metrics
        mse = self.squared_error_sum / self.records
        variance = self.labels.variance
        return {
            "rmse": float(np.sqrt(mse)),
            "mae": self.absolute_error_sum / self.records,
            "r2": float(1 - mse / variance) if variance else 0.0,
        }


def evaluate_split(spec: PipelineSpec, model, shards_manifest_uri: str, split: str = "test") -> dict:
    """The task's metrics of ``model`` on raw rows of a split, streamed batch by batch."""
    return evaluate_models(spec, {"model": lambda batch: model(batch, training=False)}, shards_manifest_uri, split)[0][
        "model"]


def evaluate_models(spec: PipelineSpec, models: dict, shards_manifest_uri: str, split: str = "test"):
    """Each model's metrics on the same raw rows of a split, in one streamed pass.

    ``models`` maps a name to a function from a batch of raw features (a dict of tensors)
    to predictions in label units. Returns ({name: metrics}, example rows, residual sample:
    the first rows' labels and the first model's predictions, for regression).
    """
    from tfjobs.storage.input_pipeline import open_shards, raw_batches

    metrics = {name: SplitMetrics(spec) for name in models}
    examples: list[dict] = []
    residuals: dict[str, list] = {"labels": [], "predictions": []}
    first = next(iter(models))
    with open_shards(shards_manifest_uri, split) as shards:
        for batch in raw_batches(shards, BATCH_SIZE):
            batch = dict(batch)
            labels = batch.pop(spec.label.name).numpy()
            if not examples:
                examples = example_rows(batch, EXAMPLE_ROWS, binary=spec.binary_features)
            for name, predict in models.items():
                predictions = np.asarray(predict(batch))
                metrics[name].update(labels, predictions)
                if name == first and spec.label.task == "regression" and len(residuals["labels"]) < RESIDUAL_SAMPLE:
                    room = RESIDUAL_SAMPLE - len(residuals["labels"])
                    residuals["labels"] += labels[:room].astype(float).tolist()
                    residuals["predictions"] += predictions.reshape(-1)[:room].astype(float).tolist()
    results = {name: {"records": m.records, **m.result()} for name, m in metrics.items()}
    return results, examples, residuals if residuals["labels"] else None


def example_rows(batch: dict, count: int, binary: Collection[str] = ()) -> list[dict]:
    """``count`` rows of a batch of raw features, JSON-ready, rows without a missing value first; ``binary``
    features (encoded files) as TF Serving's REST API takes them, ``{"b64": "<base64>"}``."""
    columns = {name: np.asarray(values) for name, values in batch.items()}
    rows = []
    for i in range(min(len(v) for v in columns.values())):
        row = {name: {"b64": base64.b64encode(values[i]).decode()} if name in binary else _json_value(values[i])
               for name, values in columns.items()}
        rows.append(row)
        if sum(1 for r in rows if None not in r.values() and "" not in r.values()) >= count:
            break
    return sorted(rows, key=lambda r: None in r.values() or "" in r.values())[:count]


def _json_value(value):
    """A raw feature value as JSON: a float32 as its shortest text (17.4, not 17.399999618530273), NaN as null."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.floating):
        return None if np.isnan(value) else float(np.format_float_positional(value, unique=True))
    return value.item() if hasattr(value, "item") else value


def saved_model_predictions(signature, spec: PipelineSpec, classes: list[str] | None):
    """A SavedModel's ``serving_default`` as a model of :func:`evaluate_models`: raw batch -> label units."""
    inputs = signature.structured_input_signature[1]
    output = "probabilities" if spec.label.task == "classification" else "predictions"
    if spec.label.task == "classification" and list(classes or []) != list(spec.label.classes):
        raise ChampionError(f"it predicts the classes {classes}, the spec has {list(spec.label.classes)}")

    def predict(batch):
        absent = sorted(set(inputs) - set(batch))
        if absent:
            raise ChampionError(f"it takes features the test split does not have: {absent}")
        try:
            return signature(**{name: batch[name] for name in inputs})[output]
        except Exception as err:  # a dtype or shape the champion's signature does not take
            raise ChampionError(f"{type(err).__name__}: {str(err)[:300]}") from err

    return predict


class ChampionError(ValueError):
    """The model in production cannot score the candidate's test rows (the spec's features changed)."""


def change_failures(spec: PipelineSpec, candidate: dict, champion: dict) -> tuple[dict, list[str]]:
    """Each ``evaluation.change`` threshold against the champion: ({metric: comparison}, failures)."""
    comparison, failures = {}, []
    for name, allowed in spec.evaluation.change.items():
        if name not in candidate or name not in champion:
            failures.append(f"{name} is not a metric of this task ({sorted(k for k in candidate if k != 'confusion_matrix')})")
            continue
        change = candidate[name] - champion[name]
        better_higher = higher_is_better(name)
        passed = change >= allowed if better_higher else change <= allowed
        comparison[name] = {"candidate": candidate[name], "champion": champion[name], "change": change,
                            "allowed": allowed, "direction": "higher is better" if better_higher else "lower is better",
                            "passed": passed}
        if not passed:
            limit = f"at least {number(allowed, '+')}" if better_higher else f"at most {number(allowed, '+')}"
            failures.append(f"{name} {number(candidate[name])} vs production's {number(champion[name])}: change "
                            f"{number(change, '+')}, allowed {limit} ({'higher' if better_higher else 'lower'} is better)")
    return comparison, failures


def number(value: float, sign: str = "") -> str:
    """57,288 (dollars), 0.9804 (accuracy): whole numbers from a thousand up, four digits below."""
    return f"{value:{sign},.0f}" if abs(value) >= 1000 else f"{value:{sign}.4g}"


def blessing_failures(spec: PipelineSpec, metrics: dict) -> list[str]:
    failures = []
    for name, bound in spec.evaluation.min.items():
        if name not in metrics:
            failures.append(f"{name} is not a metric of this task ({sorted(metrics)})")
        elif metrics[name] < bound:
            failures.append(f"{name} {metrics[name]:.4g} < required minimum {bound:.4g}")
    for name, bound in spec.evaluation.max.items():
        if name not in metrics:
            failures.append(f"{name} is not a metric of this task ({sorted(metrics)})")
        elif metrics[name] > bound:
            failures.append(f"{name} {metrics[name]:.4g} > allowed maximum {bound:.4g}")
    return failures


def evaluate_model(
    spec: PipelineSpec, model_uri: str, state_uri: str, shards_manifest_uri: str, output_uri: str,
    serving_uri: str = "", force: Forced | None = None,
) -> EvaluateResult:
    """Score the candidate (and the champion in production under ``serving_uri``, if any) and decide."""
    from tfjobs.promote import champion as production_champion

    for uri in (model_uri, state_uri, shards_manifest_uri):
        if not store_for(uri).exists(uri):
            raise FileNotFoundError(f"{uri} does not exist: run the earlier steps first")
    inputs = input_hashes(model_uri, state_uri, shards_manifest_uri)
    training = read_json_if_exists(model_uri.rsplit("/", 1)[0] + "/training.json") or {}
    if "inputs" in training:
        check_inputs(training["inputs"], inputs, {"state": state_uri, "shards_manifest": shards_manifest_uri},
                     "the model was trained with")
    champion = production_champion(serving_uri) if serving_uri else None
    # A champion that is this very model (a re-run once it is served) changes nothing: the evaluation stands.
    same_model = champion is not None and champion.metadata.get("model_sha256") == inputs["model_sha256"]
    against = [champion.version, champion.metadata.get("weights_sha256")] if champion and not same_model else None
    fingerprint = hashlib.sha256(json.dumps([inputs, spec.fingerprint(), against, bool(force)],
                                            sort_keys=True).encode()).hexdigest()
    metrics_uri = join(output_uri, METRICS_FILE)
    previous = read_json_if_exists(metrics_uri)
    if previous and previous["fingerprint"] == fingerprint:
        log.info("Evaluation at %s is up to date; nothing rewritten", metrics_uri)
        return _result(metrics_uri, previous, rewritten=False)

    from tfjobs.export import weights_fingerprint

    training_model, model = load_inference_model(model_uri, state_uri)
    weights = weights_fingerprint(training_model)
    models = {"candidate": lambda batch: model(batch, training=False)}
    champion_entry, champion_problem = None, ""
    with contextlib.ExitStack() as stack:
        if champion is not None:
            champion_entry = {"version": champion.version, "run": champion.run, "uri": champion.uri,
                              "weights_sha256": champion.metadata.get("weights_sha256")}
            if champion_entry["weights_sha256"] == weights:
                champion_problem = "it is this very model"
            else:
                try:
                    models["champion"] = _load_champion(spec, champion, stack)
                except (ValueError, OSError) as err:
                    champion_problem = f"it cannot be loaded: {err}"
        log.info("Scoring %s on the test split of %s", " and ".join(models), shards_manifest_uri)
        try:
            results, examples, residuals = evaluate_models(spec, models, shards_manifest_uri)
        except ChampionError as err:
            log.warning("Production version %d cannot score these test rows (%s); judging by the bounds alone",
                        champion.version, err)
            champion_problem = f"it cannot score these test rows: {err}"
            del models["champion"]
            results, examples, residuals = evaluate_models(spec, models, shards_manifest_uri)
    metrics = results["candidate"]
    records = metrics.pop("records")
    if champion_problem == "it is this very model":
        results["champion"] = {"records": records, **metrics}
        champion_entry["same_model"] = True
    failures = blessing_failures(spec, metrics)
    comparison, change_failed = {}, []
    if "champion" in results:
        champion_entry["metrics"] = {k: v for k, v in results["champion"].items() if k != "records"}
        comparison, change_failed = change_failures(spec, metrics, champion_entry["metrics"])
    elif champion_entry is not None:
        champion_entry["problem"] = champion_problem
    verdict, reason = decide(spec, failures, change_failed, champion_entry, force)
    report = {
        "dataset": spec.name,
        "split": "test",
        "records": records,
        "metrics": metrics,
        "thresholds": {"min": spec.evaluation.min, "max": spec.evaluation.max, "change": spec.evaluation.change},
        "blessed": not failures and (not change_failed or force is not None),
        "failures": failures + change_failed,
        "champion": champion_entry,
        "comparison": comparison,
        "verdict": verdict,
        "reason": reason,
        "forced": dataclasses.asdict(force) if force is not None and change_failed else None,
        "model": model_uri,
        "weights_sha256": weights,
        "inputs": {**inputs, "state": state_uri, "shards_manifest": shards_manifest_uri},
        "examples": examples,
        "residuals": residuals,
        "fingerprint": fingerprint,
    }
    write_json(metrics_uri, report)
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    log.info("Test metrics on %d rows: %s; %s: %s", records, headline, verdict, reason)
    return _result(metrics_uri, report, rewritten=True)


def _load_champion(spec: PipelineSpec, champion, stack: contextlib.ExitStack):
    """The champion's ``serving_default`` as a model of :func:`evaluate_models` (kept loaded in ``stack``)."""
    import tensorflow as tf

    from tfjobs.storage.store import local_dir_copy

    path = stack.enter_context(local_dir_copy(champion.uri))
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    classes = (champion.metadata.get("signature") or {}).get("classes")
    return saved_model_predictions(signature, spec, classes)


def decide(spec: PipelineSpec, failures: list[str], change_failed: list[str], champion: dict | None,
           force: Forced | None) -> tuple[str, str]:
    """(verdict, reason): ``promote``, ``promote (forced)``, ``keep production`` or ``not blessed``."""
    if failures:
        unforceable = " (a forced promotion cannot pass them: they are the spec's to change)" if force else ""
        return "not blessed", "fails the spec's absolute bounds: " + "; ".join(failures) + unforceable
    if champion is None:
        return "promote", "no model in production: judged by the absolute bounds alone, which it clears"
    version = f"production version {champion['version']} (run {champion['run'] or '?'})"
    if "metrics" not in champion:
        return "promote", (f"clears the absolute bounds; {version} was not compared because "
                           f"{champion.get('problem', 'it could not be evaluated')}")
    if champion.get("same_model"):
        return "promote", f"this model is {version} already"
    if change_failed and force is not None:
        return "promote (forced)", (f"forced by {force.by or 'unknown'} at {force.at} past the change thresholds "
                                    f"against {version}: " + "; ".join(change_failed))
    if change_failed:
        return "keep production", f"worse than {version} beyond the change thresholds: " + "; ".join(change_failed)
    if not spec.evaluation.change:
        return "promote", f"clears the absolute bounds; the spec sets no change thresholds against {version}"
    return "promote", f"within the change thresholds against {version}"


def _result(metrics_uri: str, report: dict, rewritten: bool) -> EvaluateResult:
    champion = report.get("champion") or {}
    return EvaluateResult(
        metrics_uri=metrics_uri,
        metrics={k: v for k, v in report["metrics"].items() if isinstance(v, float)},
        blessed=report["blessed"],
        failures=report["failures"],
        rewritten=rewritten,
        verdict=report.get("verdict", "promote" if report["blessed"] else "not blessed"),
        reason=report.get("reason", ""),
        champion_version=champion.get("version"),
        champion_metrics={k: v for k, v in (champion.get("metrics") or {}).items() if isinstance(v, float)},
        forced=bool(report.get("forced")),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--model", required=True, help="URI of the trained training_model.keras")
    parser.add_argument("--state", required=True, help="URI of the adapted preprocessing state.json")
    parser.add_argument("--shards", required=True, help="URI of the shard set's manifest.json")
    parser.add_argument("--output", required=True, help="output prefix URI")
    parser.add_argument("--serving", default="", help="the model's serving prefix, to compare with production's model")
    parser.add_argument("--force-by", default="", help="force promotion past the change thresholds, in this name")
    args = cli.parse(parser, argv)
    force = Forced(args.force_by, now_text()) if args.force_by else None
    cli.print_result(evaluate_model(load_spec(args.spec), args.model, args.state, args.shards, args.output,
                                    args.serving, force))


if __name__ == "__main__":
    main()
