"""Adapt the preprocessing to the training shards: one streaming pass, one readable state file.

For every feature of the spec, over the train split only, its kind
(:mod:`tfjobs.features`) keeps a streaming, mergeable statistics object and says what
goes into ``state.json``: mean and variance (and quantile bin boundaries, min and
max) for a number, a vocabulary with counts for a category, rows per bin for a
hashed one, ... The state also holds each feature's kind and options, the spec's NA
tokens and crosses, and the label's classes or mean and standard deviation: all that
:class:`tfjobs.features.preprocessing.FeaturePreprocessor` needs to build its layers,
in training and in the exported model.

Why not call ``layer.adapt()`` on each layer: ``Normalization.adapt`` turns a single
NaN into a NaN mean, and adapting layer by layer reads the shards once per layer.
This job computes the same statistics (the tests compare them with ``adapt()``) in
one pass with memory that does not grow with the data.

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
from tfjobs.features.base import RunningMoments
from tfjobs.spec import PipelineSpec, load_spec
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
    statistics = {f.name: f.statistics() for f in spec.features}
    label_values = collections.Counter()
    label_moments = RunningMoments()
    records = 0
    with open_shards(shards_manifest_uri, "train") as shards:
        for batch in raw_batches(shards, BATCH_SIZE).as_numpy_iterator():
            records += len(batch[spec.label.name])
            for name, running in statistics.items():
                running.update(batch[name])
            if spec.label.task == "classification":
                label_values.update(v.decode() for v in batch[spec.label.name])
            else:
                label_moments.update(batch[spec.label.name])
    if records == 0:
        raise ValueError(f"The train split at {shards_manifest_uri} has no records: nothing to adapt on")

    features = {f.name: {"kind": f.kind, "options": f.options.model_dump(exclude_defaults=True), **statistics[f.name].result()}
                for f in spec.features}
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
        "na_values": list(spec.na_values),
        "features": features,
        "crosses": [cross.model_dump(mode="json") for cross in spec.crosses],
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
