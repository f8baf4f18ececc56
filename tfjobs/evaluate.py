"""Evaluate the model that would be exported on the test split, and bless it or not.

The model evaluated is the inference model: the adapted preprocessing plus the
trained model, fed raw test rows, exactly what the export step writes. Metrics
are in label units (class accuracy; dollars for a price). The spec's
``evaluation`` bounds decide the blessing, as TFX's Evaluator does; the export
step publishes only a blessed model.

    python -m tfjobs.evaluate --spec include/penguins.yaml --model <run>/train/training_model.keras \\
        --state <...>/state.json --shards <...>/manifest.json --output <store>/runs/penguins/<run>/evaluate
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from tfjobs import cli
from tfjobs.spec import PipelineSpec, load_spec
from tfjobs.storage.store import join, local_copy, read_json, read_json_if_exists, store_for, write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
BATCH_SIZE = 1024


@dataclass(frozen=True)
class EvaluateResult:
    metrics_uri: str
    metrics: dict[str, float]
    blessed: bool
    failures: list[str]
    rewritten: bool


def load_inference_model(model_uri: str, state_uri: str):
    """The trained model wrapped with its preprocessing: raw features in, label units out."""
    import keras

    from tfjobs.features.preprocessing import build_inference_model

    with local_copy(model_uri) as path:
        training_model = keras.saving.load_model(path)
    return training_model, build_inference_model(read_json(state_uri), training_model)


def predict_split(model, shards_manifest_uri: str, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions) of ``model`` on raw rows of a split, in shard order."""
    from tfjobs.storage.input_pipeline import open_shards, raw_batches

    labels, predictions = [], []
    with open_shards(shards_manifest_uri, split) as shards:
        for batch in raw_batches(shards, BATCH_SIZE):
            batch = dict(batch)
            labels.append(batch.pop(label).numpy())
            predictions.append(np.asarray(model(batch, training=False)))
    return np.concatenate(labels), np.concatenate(predictions)


def task_metrics(spec: PipelineSpec, labels: np.ndarray, predictions: np.ndarray) -> dict:
    if spec.label.task == "classification":
        classes = list(spec.label.classes)
        truth = np.array([classes.index(v.decode()) for v in labels])
        predicted = predictions.argmax(axis=1)
        probability_of_truth = np.clip(predictions[np.arange(len(truth)), truth], 1e-7, 1.0)
        confusion = np.zeros((len(classes), len(classes)), np.int64)
        np.add.at(confusion, (truth, predicted), 1)
        return {
            "accuracy": float((predicted == truth).mean()),
            "log_loss": float(-np.log(probability_of_truth).mean()),
            "recall": {c: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, c in enumerate(classes)},
            "confusion_matrix": {"classes": classes, "rows_are": "truth", "counts": confusion.tolist()},
        }
    errors = predictions.reshape(-1) - labels.astype(np.float64)
    variance = float(np.var(labels))
    return {
        "rmse": float(np.sqrt(np.mean(errors**2))),
        "mae": float(np.mean(np.abs(errors))),
        "r2": float(1 - np.mean(errors**2) / variance) if variance else 0.0,
    }


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
    spec: PipelineSpec, model_uri: str, state_uri: str, shards_manifest_uri: str, output_uri: str
) -> EvaluateResult:
    for uri in (model_uri, state_uri, shards_manifest_uri):
        if not store_for(uri).exists(uri):
            raise FileNotFoundError(f"{uri} does not exist: run the earlier steps first")
    fingerprint = hashlib.sha256(
        b"".join(store_for(u).read_bytes(u) for u in (model_uri, state_uri, shards_manifest_uri))
        + spec.fingerprint().encode()
    ).hexdigest()
    metrics_uri = join(output_uri, METRICS_FILE)
    previous = read_json_if_exists(metrics_uri)
    if previous and previous["fingerprint"] == fingerprint:
        log.info("Evaluation at %s is up to date; nothing rewritten", metrics_uri)
        return _result(metrics_uri, previous, rewritten=False)

    _, model = load_inference_model(model_uri, state_uri)
    labels, predictions = predict_split(model, shards_manifest_uri, "test", spec.label.name)
    metrics = task_metrics(spec, labels, predictions)
    failures = blessing_failures(spec, metrics)
    report = {
        "dataset": spec.name,
        "split": "test",
        "records": int(len(labels)),
        "metrics": metrics,
        "thresholds": {"min": spec.evaluation.min, "max": spec.evaluation.max},
        "blessed": not failures,
        "failures": failures,
        "model": model_uri,
        "fingerprint": fingerprint,
    }
    write_json(metrics_uri, report)
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    log.info("Test metrics on %d rows: %s; %s", len(labels), headline, "blessed" if not failures else failures)
    return _result(metrics_uri, report, rewritten=True)


def _result(metrics_uri: str, report: dict, rewritten: bool) -> EvaluateResult:
    return EvaluateResult(
        metrics_uri=metrics_uri,
        metrics={k: v for k, v in report["metrics"].items() if isinstance(v, float)},
        blessed=report["blessed"],
        failures=report["failures"],
        rewritten=rewritten,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--model", required=True, help="URI of the trained training_model.keras")
    parser.add_argument("--state", required=True, help="URI of the adapted preprocessing state.json")
    parser.add_argument("--shards", required=True, help="URI of the shard set's manifest.json")
    parser.add_argument("--output", required=True, help="output prefix URI")
    args = cli.parse(parser, argv)
    cli.print_result(evaluate_model(load_spec(args.spec), args.model, args.state, args.shards, args.output))


if __name__ == "__main__":
    main()
