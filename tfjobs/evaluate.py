"""Evaluate the model that would be exported on the test split, and bless it or not.

The model evaluated is the inference model: the adapted preprocessing plus the
trained model, fed raw test rows, exactly what the export step writes. A run binds
its inputs: the state is the run's copy (``train/state.json``), and evaluate refuses
shards or a state other than those the model was trained on (another run of the same
partition may have rewritten them); ``metrics.json`` records the SHA-256 of the model,
the state and the shard manifest it blessed, which the export step checks. Metrics
are in label units (class accuracy; dollars for a price). The spec's
``evaluation`` bounds decide the blessing, as TFX's Evaluator does; the export
step publishes only a blessed model.

    python -m tfjobs.evaluate --spec include/penguins.yaml --model <run>/train/training_model.keras \\
        --state <...>/state.json --shards <...>/manifest.json --output <store>/runs/penguins/<run>/evaluate
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from tfjobs import cli
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
    from tfjobs.storage.input_pipeline import open_shards, raw_batches

    metrics = SplitMetrics(spec)
    with open_shards(shards_manifest_uri, split) as shards:
        for batch in raw_batches(shards, BATCH_SIZE):
            batch = dict(batch)
            labels = batch.pop(spec.label.name).numpy()
            metrics.update(labels, np.asarray(model(batch, training=False)))
    return {"records": metrics.records, **metrics.result()}


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
    inputs = input_hashes(model_uri, state_uri, shards_manifest_uri)
    training = read_json_if_exists(model_uri.rsplit("/", 1)[0] + "/training.json") or {}
    if "inputs" in training:
        check_inputs(training["inputs"], inputs, {"state": state_uri, "shards_manifest": shards_manifest_uri},
                     "the model was trained with")
    fingerprint = hashlib.sha256(json.dumps([inputs, spec.fingerprint()], sort_keys=True).encode()).hexdigest()
    metrics_uri = join(output_uri, METRICS_FILE)
    previous = read_json_if_exists(metrics_uri)
    if previous and previous["fingerprint"] == fingerprint:
        log.info("Evaluation at %s is up to date; nothing rewritten", metrics_uri)
        return _result(metrics_uri, previous, rewritten=False)

    _, model = load_inference_model(model_uri, state_uri)
    metrics = evaluate_split(spec, model, shards_manifest_uri)
    records = metrics.pop("records")
    failures = blessing_failures(spec, metrics)
    report = {
        "dataset": spec.name,
        "split": "test",
        "records": records,
        "metrics": metrics,
        "thresholds": {"min": spec.evaluation.min, "max": spec.evaluation.max},
        "blessed": not failures,
        "failures": failures,
        "model": model_uri,
        "inputs": {**inputs, "state": state_uri, "shards_manifest": shards_manifest_uri},
        "fingerprint": fingerprint,
    }
    write_json(metrics_uri, report)
    headline = {k: v for k, v in metrics.items() if isinstance(v, float)}
    log.info("Test metrics on %d rows: %s; %s", records, headline, "blessed" if not failures else failures)
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
