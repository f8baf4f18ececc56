"""Adapt the preprocessing to the training shards: one streaming pass, one readable state file.

For every feature of the spec, over the train split only:

- numeric: count, missing count, mean and (population) variance of the values
  present, min and max: what ``keras.layers.Normalization`` needs;
- categorical / integer categorical: the vocabulary, most frequent first (ties by
  value), with counts, plus the missing token: what ``StringLookup`` /
  ``IntegerLookup`` need. Values seen fewer than the feature's ``min_frequency``
  times stay out of the vocabulary: they share the out-of-vocabulary index with
  values never seen, which gives that index training examples (the state counts
  them under ``infrequent``);
- the label: class counts, or mean and standard deviation for regression.

Why not call ``layer.adapt()`` on each layer: ``Normalization.adapt`` turns a single
NaN into a NaN mean, and adapting layer by layer reads the shards once per layer.
This job computes the same statistics (the tests compare them with ``adapt()``) in
one pass with memory that does not grow with the data, and
:class:`tfjobs.preprocessing.FeaturePreprocessor` builds the stock layers from them.

    python -m tfjobs.adapt --spec include/penguins.yaml --shards <store>/shards/penguins/2026-11-25/manifest.json \\
        --output <store>/preprocessing/penguins/2026-11-25
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from tfjobs import cli
from tfjobs.spec import MISSING_INTEGER, MISSING_STRING, PipelineSpec, load_spec
from tfjobs.storage.store import join, read_json_if_exists, store_for, write_json

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
BATCH_SIZE = 8192


@dataclass(frozen=True)
class AdaptResult:
    state_uri: str
    records: int
    vocabulary_sizes: dict[str, int]
    rewritten: bool


class RunningMoments:
    """Count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def update(self, values: np.ndarray) -> None:
        values = values.astype(np.float64)
        if values.size == 0:
            return
        n, mean = values.size, float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0


def vocabulary_from_counts(
    counts: collections.Counter, missing_token, min_frequency: int = 1
) -> tuple[list, list[int]]:
    """Most frequent first, ties by value; the missing token always has an index of its own.

    Values seen fewer than ``min_frequency`` times are left out (they will look up
    as out-of-vocabulary).
    """
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    items = [(k, c) for k, c in items if c >= min_frequency or k == missing_token]
    if missing_token not in counts:
        items.append((missing_token, 0))
    return [k for k, _ in items], [c for _, c in items]


def adapt_preprocessing(spec: PipelineSpec, shards_manifest_uri: str, output_uri: str) -> AdaptResult:
    from tfjobs.storage.input_pipeline import open_shards, raw_batches

    store = store_for(shards_manifest_uri)
    if not store.exists(shards_manifest_uri):
        raise FileNotFoundError(f"No finished shards at {shards_manifest_uri}: run the shard step first")
    manifest_bytes = store.read_bytes(shards_manifest_uri)
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    state_uri = join(output_uri, STATE_FILE)
    previous = read_json_if_exists(state_uri)
    if previous and previous["shards_manifest_sha256"] == manifest_sha and previous["spec"] == spec.fingerprint():
        log.info("Preprocessing state at %s is up to date; nothing rewritten", state_uri)
        return _result(state_uri, previous, rewritten=False)
    moments = {f.name: RunningMoments() for f in spec.features if f.kind == "numeric"}
    missing = collections.Counter()
    counts = {f.name: collections.Counter() for f in spec.features if f.is_categorical}
    label_values = collections.Counter()
    label_moments = RunningMoments()
    records = 0
    with open_shards(shards_manifest_uri, "train") as shards:
        for batch in raw_batches(shards, BATCH_SIZE).as_numpy_iterator():
            records += len(batch[spec.label.name])
            for name, running in moments.items():
                values = batch[name]
                present = ~np.isnan(values)
                missing[name] += int((~present).sum())
                running.update(values[present])
            for name, counter in counts.items():
                values, value_counts = np.unique(batch[name], return_counts=True)
                keys = [v.decode() for v in values] if values.dtype == object else values.tolist()
                counter.update(dict(zip(keys, value_counts.tolist())))
            if spec.label.task == "classification":
                label_values.update(v.decode() for v in batch[spec.label.name])
            else:
                label_moments.update(batch[spec.label.name])
    if records == 0:
        raise ValueError(f"The train split at {shards_manifest_uri} has no records: nothing to adapt on")

    features = {}
    for feature in spec.features:
        if feature.kind == "numeric":
            running = moments[feature.name]
            if running.count == 0:
                raise ValueError(f"Feature {feature.name!r} has no values in the train split: cannot normalize it")
            features[feature.name] = {
                "kind": "numeric",
                "mean": running.mean,
                "variance": running.variance,
                "min": running.min,
                "max": running.max,
                "count": running.count,
                "missing": missing[feature.name],
            }
        else:
            token = MISSING_STRING if feature.kind == "categorical" else MISSING_INTEGER
            vocabulary, vocabulary_counts = vocabulary_from_counts(counts[feature.name], token, feature.min_frequency)
            kept = set(vocabulary)
            infrequent = {k: c for k, c in counts[feature.name].items() if k not in kept}
            features[feature.name] = {
                "kind": feature.kind,
                "vocabulary": vocabulary,
                "counts": vocabulary_counts,
                "missing_token": token,
                "missing": counts[feature.name][token],
                "infrequent": {"min_frequency": feature.min_frequency, "values": len(infrequent),
                               "rows": sum(infrequent.values())},
            }
            if infrequent:
                log.info(
                    "%s: %d values seen fewer than %d times (%d rows) share the out-of-vocabulary index",
                    feature.name, len(infrequent), feature.min_frequency, sum(infrequent.values()),
                )
    if spec.label.task == "classification":
        label = {
            "name": spec.label.name,
            "task": "classification",
            "classes": list(spec.label.classes),
            "counts": [label_values[c] for c in spec.label.classes],
        }
    else:
        label = {
            "name": spec.label.name,
            "task": "regression",
            "scaling": spec.label.scaling,
            "mean": label_moments.mean,
            "std": float(np.sqrt(label_moments.variance)) or 1.0,
        }
    state = {
        "dataset": spec.name,
        "spec": spec.fingerprint(),
        "shards_manifest_sha256": manifest_sha,
        "records": records,
        "features": features,
        "label": label,
    }
    write_json(state_uri, state)
    result = _result(state_uri, state, rewritten=True)
    log.info("Adapted preprocessing on %d training records: vocabularies %s", records, result.vocabulary_sizes)
    return result


def _result(state_uri: str, state: dict, rewritten: bool) -> AdaptResult:
    return AdaptResult(
        state_uri=state_uri,
        records=state["records"],
        vocabulary_sizes={n: len(f["vocabulary"]) for n, f in state["features"].items() if "vocabulary" in f},
        rewritten=rewritten,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.adapt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--shards", required=True, help="URI of the shard set's manifest.json")
    parser.add_argument("--output", required=True, help="output prefix URI")
    args = cli.parse(parser, argv)
    cli.print_result(adapt_preprocessing(load_spec(args.spec), args.shards, args.output))


if __name__ == "__main__":
    main()
