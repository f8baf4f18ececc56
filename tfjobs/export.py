"""Export a blessed model for serving: raw features in, predictions out.

Writes ``serving/<model_name>/<version>/`` in the TF Serving layout, a SavedModel
with two signatures:

- ``serving_default``: one 1-D tensor per raw feature, in its kind's serving dtype
  (float32 with NaN for a missing number, a string for a category, int64 for an id;
  see :mod:`tfjobs.features`);
- ``serving_raw``: every feature as the text of a CSV cell (a string), parsed and
  cleaned inside the model exactly as the validate step parses and cleans a delivery
  (surrounding whitespace stripped, NA tokens made missing);

plus ``model.keras`` (the same inference model as a Keras file), ``shardline.json``
(where it came from, its test metrics and its signature) and, when the statistics step
ran, ``statistics.json``: the profile of the data the model was trained on, which
later deliveries are checked against for drift while it is in production.

Before anything is published, a fresh Python process loads the SavedModel and
predicts raw test rows, rows with each feature missing or never seen in training,
and the same rows as CSV text with whitespace and NA-token variants through
``serving_raw``; its answers must match the training pipeline's predictions for
the clean rows (training/serving skew check). The version is then published:
renamed into place on a local store (atomic: of two runs racing for one version,
exactly one wins); on an object store the version is first claimed atomically
(``<serving>/.claims/<version>``, a create-if-absent PUT), then uploaded under a hidden
staging prefix and copied into ``<version>/`` on the server, ``saved_model.pb`` last
(TF Serving loads any integer directory it finds, complete or not). A run that loses
the race fails with :class:`VersionTakenError` and never touches the winner's files;
a retry of the same model (same weights fingerprint) after a kill takes over its own claim.

Versions are integers; the caller proposes one (the run's logical date in Unix
seconds). Published versions are never overwritten: re-exporting the same model
finds its version and writes nothing; a different model whose proposed version is
taken gets the next free integer of the same UTC day (proposed + 1, + 2, ...), so a
retrained old date never overtakes a newer date in TF Serving's "latest" policy.
When the day has no free second left, the export fails.

    python -m tfjobs.export --spec include/penguins.yaml --model <run>/train/training_model.keras \\
        --state <...>/state.json --shards <...>/manifest.json --metrics <run>/evaluate/metrics.json \\
        --serving <store>/serving/penguins --version 1764028800
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfjobs import cli
from tfjobs.promote import run_of
from tfjobs.spec import PipelineSpec, load_spec
from tfjobs.storage.store import (
    CLAIMS_DIR,
    AlreadyPublishedError,
    join,
    read_json,
    staging_dir,
    store_for,
)

log = logging.getLogger(__name__)

SAVED_MODEL_MARKER = "saved_model.pb"
METADATA_FILE = "shardline.json"
KERAS_FILE = "model.keras"
RAW_SIGNATURE = "serving_raw"
STATISTICS_FILE = "statistics.json"
#: The skew check compares this many test rows at most (the first ones), plus the edge rows: its memory is bounded.
SKEW_CHECK_ROWS = 10_000


class NotBlessedError(RuntimeError):
    """The evaluation did not bless the model, so it must not be served."""


class VersionTakenError(RuntimeError):
    """Another run published the chosen version first; a retry picks the next free one."""


class ServingSkewError(RuntimeError):
    """The exported model answers differently from the training pipeline."""


@dataclass(frozen=True)
class ExportArgs:
    spec: PipelineSpec
    model_uri: str
    state_uri: str
    shards_manifest_uri: str
    metrics_uri: str
    serving_uri: str
    version: int
    statistics_uri: str = ""  # the training partition's statistics.json, kept with the version (drift baseline)


@dataclass(frozen=True)
class ExportResult:
    version: int
    version_uri: str
    keras_uri: str
    max_skew: float
    rewritten: bool


def published_versions(serving_uri: str) -> dict[int, str]:
    """Complete versions under a model's serving prefix: {version: uri}."""
    versions = {}
    prefix = serving_uri.rstrip("/") + "/"
    for uri in store_for(serving_uri).list(serving_uri):
        version, _, rest = uri[len(prefix) :].partition("/")
        if version.isdigit() and rest == SAVED_MODEL_MARKER:
            versions[int(version)] = join(serving_uri, version)
    return dict(sorted(versions.items()))


def claimed_versions(serving_uri: str, first: int, end: int, owner: str) -> set[int]:
    """Versions in ``[first, end)`` claimed by a publish of another model that never finished (killed).

    On an object store an exclusive publish first claims its version
    (``<serving>/.claims/<version>``, see ``ObjectStore.claim``) and drops the claim once
    published; a leftover claim of another owner keeps that number off this model.
    """
    store = store_for(serving_uri)
    taken = set()
    prefix = join(serving_uri, CLAIMS_DIR) + "/"
    for uri in store.list(join(serving_uri, CLAIMS_DIR)):
        name = uri[len(prefix):]
        if name.isdigit() and first <= int(name) < end:
            current = store.read_versioned(uri)
            if current is not None and json.loads(current[0]).get("owner") != owner:
                taken.add(int(name))
    return taken


def weights_fingerprint(model) -> str:
    digest = hashlib.sha256()
    for weights in model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return digest.hexdigest()


def export_model(args: ExportArgs) -> ExportResult:
    spec = args.spec
    evaluation = read_json(args.metrics_uri)
    if not evaluation["blessed"]:
        raise NotBlessedError(f"Model {args.model_uri} was not blessed: {'; '.join(evaluation['failures'])}")
    if args.version < 1:
        raise ValueError(f"A serving version must be a positive integer, got {args.version}")

    from tfjobs.evaluate import check_inputs, input_hashes, load_inference_model

    # The blessing is for one model, with one state, on one shard set: refuse any other pairing.
    check_inputs(evaluation.get("inputs", {}), input_hashes(args.model_uri, args.state_uri, args.shards_manifest_uri),
                 {"model": args.model_uri, "state": args.state_uri, "shards_manifest": args.shards_manifest_uri},
                 "the blessing in " + args.metrics_uri + " was for")
    training_model, inference_model = load_inference_model(args.model_uri, args.state_uri)
    fingerprint = weights_fingerprint(training_model)
    store = store_for(args.serving_uri)
    versions = published_versions(args.serving_uri)
    for version, uri in versions.items():
        metadata_uri = join(uri, METADATA_FILE)
        if store.exists(metadata_uri) and read_json(metadata_uri).get("weights_sha256") == fingerprint:
            log.info("This model is already published as version %d at %s; nothing rewritten", version, uri)
            return ExportResult(version, uri, join(uri, KERAS_FILE), read_json(metadata_uri)["max_skew"], False)
    # TF Serving serves the highest version: a retrained day takes the next free second of that
    # UTC day, never max(versions) + 1, so that versions keep the order of the data's dates.
    next_day = (args.version // 86_400 + 1) * 86_400
    taken = set(versions) | claimed_versions(args.serving_uri, args.version, next_day, fingerprint)
    version = next((v for v in range(args.version, next_day) if v not in taken), None)
    if version is None:
        raise RuntimeError(
            f"No free serving version under {args.serving_uri} from {args.version} to the end of its day "
            f"({next_day - 1}): every second of it holds another model. Delete versions of that day you no "
            "longer serve, or propose a version of another day."
        )
    if version != args.version:
        log.info("Version %d already holds (or is claimed for) another model; publishing as version %d",
                 args.version, version)

    state = read_json(args.state_uri)
    statistics = _training_statistics(args)
    with staging_dir() as tmp:
        model_dir = tmp / str(version)
        write_saved_model(inference_model, state, model_dir)
        inference_model.save(model_dir / KERAS_FILE)
        max_skew = check_serving_skew(spec, training_model, state, args.shards_manifest_uri, model_dir, tmp)
        metadata = {
            "dataset": spec.name,
            "model_name": spec.model_name,
            "version": version,
            "weights_sha256": fingerprint,
            "trained_model": args.model_uri,
            "preprocessing_state": args.state_uri,
            "shards": args.shards_manifest_uri,
            "test_metrics": {k: v for k, v in evaluation["metrics"].items() if isinstance(v, float)},
            "max_skew": max_skew,
            "signature": signature_description(state),
            "run": run_of(args.model_uri),
            "model_sha256": evaluation.get("inputs", {}).get("model_sha256"),
            "forced": evaluation.get("forced"),
        }
        if statistics is not None:
            (model_dir / STATISTICS_FILE).write_bytes(statistics)
            metadata["statistics"] = STATISTICS_FILE
        (model_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        version_uri = join(args.serving_uri, str(version))
        try:  # another run of the day (a manual trigger and the scheduled one) may have taken the version meanwhile
            store.publish_dir(model_dir, version_uri, last=[SAVED_MODEL_MARKER], exclusive=True, owner=fingerprint)
        except AlreadyPublishedError as err:
            raise VersionTakenError(
                f"Version {version} under {args.serving_uri} was taken by another run while this one exported ({err}): "
                "it was not overwritten. Run the export again (retry the task): it takes the next free version, "
                "or finds this model already published."
            ) from err
    log.info("Published %s version %d at %s (max skew %.2g)", spec.model_name, version, version_uri, max_skew)
    return ExportResult(version, version_uri, join(version_uri, KERAS_FILE), max_skew, True)


def _training_statistics(args: ExportArgs) -> bytes | None:
    """The statistics of the data the model was trained on, checked against the shards' input; None if absent."""
    if not args.statistics_uri or not store_for(args.statistics_uri).exists(args.statistics_uri):
        return None
    data = store_for(args.statistics_uri).read_bytes(args.statistics_uri)
    trained_on = read_json(args.shards_manifest_uri).get("input_sha256")
    if json.loads(data).get("data_sha256") != trained_on:
        from tfjobs.evaluate import InputMismatchError

        raise InputMismatchError(
            f"The statistics at {args.statistics_uri} describe other data than the shards at "
            f"{args.shards_manifest_uri} were cut from: re-run the statistics step for this partition.")
    return data


def signature_description(state: dict) -> dict:
    """The signatures as a REST client sees them: each input's dtype and how to send it."""
    from tfjobs.features import feature_from_state

    inputs = {}
    for name, entry in state["features"].items():
        serving = feature_from_state(name, entry).serving()
        inputs[name] = {"kind": entry["kind"], "dtype": serving.dtype, "send": serving.rest}
    if state["label"]["task"] == "classification":
        outputs = {"probabilities": "float32 [batch, classes]", "class_ids": "int64", "classes": "string"}
    else:
        outputs = {"predictions": "float32"}
    return {"inputs": inputs, "outputs": outputs, "classes": state["label"].get("classes"),
            RAW_SIGNATURE: "the same inputs, each as the text of a CSV cell (a string); the same outputs"}


def write_saved_model(inference_model, state: dict, path: Path) -> None:
    """A SavedModel whose ``serving_default`` takes raw features by name, ``serving_raw`` their CSV text."""
    import keras
    import tensorflow as tf

    from tfjobs.features.preprocessing import serving_inputs

    signature = serving_inputs(state)
    texts = {name: tf.TensorSpec([None], tf.string, name=name) for name in signature}
    preprocess = inference_model.get_layer("preprocess")
    label = state["label"]
    classes = tf.constant(label.get("classes") or [""])

    def serve(features):
        outputs = inference_model(features, training=False)
        if label["task"] == "classification":
            class_ids = tf.argmax(outputs, axis=-1)
            return {"probabilities": outputs, "class_ids": class_ids, "classes": tf.gather(classes, class_ids)}
        return {"predictions": tf.reshape(outputs, [-1])}

    def serve_text(features):
        return serve(preprocess.parse_text(features))

    archive = keras.export.ExportArchive()
    archive.track(inference_model)
    archive.add_endpoint(name="serving_default", fn=serve, input_signature=[signature])
    archive.add_endpoint(name=RAW_SIGNATURE, fn=serve_text, input_signature=[texts])
    archive.write_out(str(path), verbose=False)


def edge_rows(state: dict, template: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows where one feature at a time takes each of its kind's edge values (missing, never seen, far out of
    range), the others the first test row's values; and one row where every feature takes its first edge value."""
    from tfjobs.features import feature_from_state

    features = [feature_from_state(name, entry) for name, entry in state["features"].items()]
    edges = {f.name: f.edge_values(state["features"][f.name]) for f in features}
    columns: dict[str, list] = {f.name: [] for f in features}
    for feature in features:
        for value in edges[feature.name]:
            for name in columns:
                columns[name].append(value if name == feature.name else template[name][0])
    for name in columns:
        columns[name].append(edges[name][0] if edges[name] else template[name][0])
    return {name: np.array(values, dtype=template[name].dtype) for name, values in columns.items()}


def text_rows(state: dict, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``rows`` as raw CSV text, as deliveries vary it: whitespace around values, NA tokens for missing ones."""
    from tfjobs.features import feature_from_state

    return {name: np.array(feature_from_state(name, entry).text_variants(rows[name], state["na_values"]), dtype=object)
            for name, entry in state["features"].items()}


def check_serving_skew(
    spec: PipelineSpec, training_model, state: dict, shards_manifest_uri: str, saved_model: Path, tmp: Path
) -> float:
    """Max |serving - training pipeline| over test rows (the first ``SKEW_CHECK_ROWS``) and edge rows, typed and as
    CSV text, checked in a fresh process."""
    import tensorflow as tf

    from tfjobs.features.preprocessing import FeaturePreprocessor, label_output_layer
    from tfjobs.storage.input_pipeline import open_shards, raw_batches

    with open_shards(shards_manifest_uri, "test") as shards:
        batches = list(raw_batches(shards, SKEW_CHECK_ROWS).take(1).as_numpy_iterator())
    rows = {name: np.concatenate([b[name] for b in batches]) for name in state["features"]}
    edges = edge_rows(state, rows)
    rows = {name: np.concatenate([rows[name], edges[name]]) for name in rows}

    # The training pipeline's view: the input pipeline's preprocessing, then the training model.
    preprocessor = FeaturePreprocessor(state)
    encoded = preprocessor({name: tf.constant(values) for name, values in rows.items()})
    expected = training_model(encoded, training=False)
    unscale = label_output_layer(state)
    if unscale is not None:
        expected = unscale(expected)
    expected = np.asarray(expected)
    if spec.label.task == "regression":
        expected = expected.reshape(-1)
    if not np.isfinite(expected).all():
        raise ServingSkewError("The training pipeline predicts non-finite values for some test or edge rows")

    np.savez(tmp / "rows.npz", **_without_objects(rows))
    np.savez(tmp / "texts.npz", **_without_objects(text_rows(state, rows)))
    np.save(tmp / "expected.npy", expected)
    output = "probabilities" if spec.label.task == "classification" else "predictions"
    completed = subprocess.run(
        [sys.executable, "-m", "tfjobs.export", "check", "--saved-model", str(saved_model),
         "--rows", str(tmp / "rows.npz"), "--texts", str(tmp / "texts.npz"), "--expected", str(tmp / "expected.npy"),
         "--output-name", output],
        capture_output=True, text=True, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    if completed.returncode != 0:
        raise ServingSkewError(f"Serving skew check failed:\n{completed.stdout}\n{completed.stderr[-3000:]}")
    report = json.loads(completed.stdout)
    log.info("Serving skew check on %d rows in a fresh process: max |diff| %.3g typed, %.3g as CSV text",
             report["rows"], report["max_abs_diff"], report["max_abs_diff_text"])
    return max(report["max_abs_diff"], report["max_abs_diff_text"])


def _without_objects(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """String columns (object arrays) as fixed-width UTF-8 bytes: an .npz of them loads without unpickling."""
    utf8 = np.frompyfunc(lambda v: v if isinstance(v, bytes) else str(v).encode(), 1, 1)
    return {name: utf8(values).astype(bytes) if values.dtype == object else values for name, values in columns.items()}


def _check_main(args) -> int:
    """Run in a fresh process: load the SavedModel, predict typed rows and their CSV text, compare."""
    import tensorflow as tf

    expected = np.load(args.expected)
    loaded = tf.saved_model.load(args.saved_model)
    report = {"rows": int(len(expected)), "tolerance": 1e-5 * max(1.0, float(np.abs(expected).max()))}
    failed = False
    for key, signature, path in (("max_abs_diff", "serving_default", args.rows),
                                 ("max_abs_diff_text", RAW_SIGNATURE, args.texts)):
        rows = dict(np.load(path))
        serve = loaded.signatures[signature]
        actual = serve(**{name: tf.constant(values) for name, values in rows.items()})[args.output_name].numpy()
        diff = float(np.abs(actual - expected).max()) if actual.shape == expected.shape else float("inf")
        report[key] = diff
        if actual.shape != expected.shape or not np.isfinite(actual).all() or diff > report["tolerance"]:
            print(f"{signature} differs from the training pipeline: shape {actual.shape} vs {expected.shape}, "
                  f"max |diff| {diff}", file=sys.stderr)
            failed = True
    print(json.dumps(report))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="python -m tfjobs.export check", description=_check_main.__doc__)
        parser.add_argument("--saved-model", required=True)
        parser.add_argument("--rows", required=True, help=".npz of raw feature columns")
        parser.add_argument("--texts", required=True, help=".npz of the same rows as CSV text")
        parser.add_argument("--expected", required=True, help=".npy of the training pipeline's predictions")
        parser.add_argument("--output-name", required=True, help="the signature output to compare")
        sys.exit(_check_main(parser.parse_args(argv[1:])))
    parser = argparse.ArgumentParser(prog="python -m tfjobs.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--model", required=True, help="URI of the trained training_model.keras")
    parser.add_argument("--state", required=True, help="URI of the adapted preprocessing state.json")
    parser.add_argument("--shards", required=True, help="URI of the shard set's manifest.json")
    parser.add_argument("--metrics", required=True, help="URI of the evaluate step's metrics.json")
    parser.add_argument("--serving", required=True, help="serving prefix URI: <store>/serving/<model_name>")
    parser.add_argument("--version", required=True, type=int, help="proposed version number")
    parser.add_argument("--statistics", default="", help="URI of the partition's statistics.json, kept with the version")
    args = cli.parse(parser, argv)
    result = export_model(
        ExportArgs(load_spec(args.spec), args.model, args.state, args.shards, args.metrics, args.serving, args.version,
                   args.statistics)
    )
    cli.print_result(result)


if __name__ == "__main__":
    main()
