"""Training, evaluation and the exported model, on the penguins pipeline."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from tfjobs.evaluate import evaluate_model
from tfjobs.export import ExportArgs, NotBlessedError, export_model, published_versions
from tfjobs.storage.store import read_json, store_for, write_json
from tfjobs.train import TrainArgs, train_model


def test_training_leaves_model_checkpoints_logs_and_curve(penguins_pipeline):
    run = penguins_pipeline
    prefix = run.layout.run_dir + "/train/"
    names = {f[len(prefix):] for f in store_for(prefix).list(prefix)}
    assert {"training_model.keras", "checkpoints/best.weights.h5", "history.json", "training_curve.png",
            "training.json"} <= names
    assert any(n.startswith("tensorboard/train/events.out.tfevents") for n in names)
    history = read_json(run.layout.run_dir + "/train/history.json")
    assert len(history["loss"]) == run.train.epochs_run
    assert history["loss"][-1] < history["loss"][0]


def test_retraining_the_same_inputs_is_skipped_unless_forced(penguins_pipeline):
    run = penguins_pipeline
    args = TrainArgs(run.spec, run.shard.manifest_uri, run.adapt.state_uri, run.layout.run_dir + "/train")
    assert not train_model(args).rewritten


def test_exported_model_is_accurate_on_the_test_split(penguins_pipeline):
    metrics = read_json(penguins_pipeline.evaluate.metrics_uri)
    assert metrics["blessed"] and metrics["metrics"]["accuracy"] >= 0.95
    assert sum(map(sum, metrics["metrics"]["confusion_matrix"]["counts"])) == penguins_pipeline.shard.records["test"]


SERVE_RAW_ROWS = """
import json, sys
import numpy as np, tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
inputs = serve.structured_input_signature[1]
out = serve(
    bill_length_mm=tf.constant([39.1, np.nan, 50.0]),
    bill_depth_mm=tf.constant([18.7, np.nan, 15.2]),
    flipper_length_mm=tf.constant([181.0, 200.0, np.nan]),
    body_mass_g=tf.constant([3750.0, 4000.0, 5700.0]),
    island=tf.constant(["Torgersen", "Atlantis", ""]),
    sex=tf.constant(["male", "", "female"]),
    year=tf.constant([2007, 2031, -1], tf.int64),
)
print(json.dumps({"dtypes": {k: v.dtype.name for k, v in inputs.items()},
                  "probabilities": out["probabilities"].numpy().tolist(),
                  "classes": [c.decode() for c in out["classes"].numpy()]}))
"""


def test_saved_model_answers_raw_rows_in_a_fresh_process(penguins_pipeline):
    version_dir = store_for("/").local_path(penguins_pipeline.export.version_uri)
    assert (version_dir / "saved_model.pb").exists() and (version_dir / "model.keras").exists()
    completed = subprocess.run([sys.executable, "-c", SERVE_RAW_ROWS, str(version_dir)],
                               capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout)
    assert result["dtypes"] == {"bill_length_mm": "float32", "bill_depth_mm": "float32",
                                "flipper_length_mm": "float32", "body_mass_g": "float32",
                                "island": "string", "sex": "string", "year": "int64"}
    probabilities = np.array(result["probabilities"])
    assert probabilities.shape == (3, 3)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert result["classes"][0] == "Adelie"


SERVE_DIRTY_ROWS = """
import json, sys
import numpy as np, tensorflow as tf
signatures = tf.saved_model.load(sys.argv[1]).signatures
clean = dict(
    bill_length_mm=tf.constant([39.1, np.nan, 50.0, np.nan]),
    bill_depth_mm=tf.constant([18.7, np.nan, 15.2, 17.0]),
    flipper_length_mm=tf.constant([181.0, 200.0, np.nan, np.nan]),
    body_mass_g=tf.constant([3750.0, 4000.0, 5700.0, np.nan]),
    island=tf.constant(["Torgersen", "Dream", "", ""]),
    sex=tf.constant(["male", "", "female", ""]),
    year=tf.constant([2007, 2008, -1, -1], tf.int64),
)
# The same rows as a CSV delivery might write them: whitespace around values, NA tokens for missing ones.
dirty_text = dict(
    bill_length_mm=tf.constant([" 39.1", "NA", "50.0 ", "null"]),
    bill_depth_mm=tf.constant(["18.7\t", "", " 15.2", "17"]),
    flipper_length_mm=tf.constant(["181", " 200.0 ", "N/A", "NaN"]),
    body_mass_g=tf.constant(["3750", "4000", "\t5700", " None "]),
    island=tf.constant([" Torgersen ", "Dream\t", "NA", " null"]),
    sex=tf.constant(["male ", "", " female", "N/A"]),
    year=tf.constant([" 2007", "2008.0", "NA", ""]),
)
# Typed values, with categories padded and NA tokens for missing ones.
dirty_typed = dict(clean, island=tf.constant([" Torgersen", "Dream ", "NA", "null"]),
                   sex=tf.constant(["\tmale", "None", "female ", " NA "]))
out = {name: signatures[sig](**rows)["probabilities"].numpy().tolist() for name, sig, rows in (
    ("clean", "serving_default", clean), ("text", "serving_raw", dirty_text),
    ("typed", "serving_default", dirty_typed))}
print(json.dumps(out))
"""


def test_the_served_model_cleans_raw_values_as_validate_does(penguins_pipeline):
    """Whitespace and NA-token variants of every feature give exactly the predictions of the clean values."""
    version_dir = store_for("/").local_path(penguins_pipeline.export.version_uri)
    completed = subprocess.run([sys.executable, "-c", SERVE_DIRTY_ROWS, str(version_dir)],
                               capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout)
    assert result["text"] == result["clean"]
    assert result["typed"] == result["clean"]


def test_keras_file_reloads_with_identical_predictions(penguins_pipeline):
    import keras
    import tensorflow as tf

    from tfjobs.evaluate import load_inference_model

    run = penguins_pipeline
    _, in_memory = load_inference_model(run.train.model_uri, run.adapt.state_uri)
    reloaded = keras.saving.load_model(store_for("/").local_path(run.export.keras_uri))
    rows = {"bill_length_mm": [40.0, np.nan], "bill_depth_mm": [18.0, 15.0], "flipper_length_mm": [190.0, 220.0],
            "body_mass_g": [3800.0, 5000.0], "island": ["Dream", "nowhere"], "sex": ["male", ""],
            "year": [2008, 1999]}
    batch = {k: tf.constant(v, tf.int64 if k == "year" else None) for k, v in rows.items()}
    np.testing.assert_allclose(reloaded(batch), in_memory(batch), atol=1e-6)


def test_export_of_the_same_model_rewrites_nothing(penguins_pipeline):
    run = penguins_pipeline
    args = ExportArgs(run.spec, run.train.model_uri, run.adapt.state_uri, run.shard.manifest_uri,
                      run.evaluate.metrics_uri, run.layout.serving, 1764115200)
    again = export_model(args)
    assert (again.version, again.rewritten) == (run.export.version, False)
    assert list(published_versions(run.layout.serving)) == [run.export.version]


def another_models_version(serving: Path, version: int) -> None:
    (serving / str(version)).mkdir(parents=True)
    (serving / str(version) / "saved_model.pb").write_bytes(b"another model")
    write_json(str(serving / str(version) / "shardline.json"), {"weights_sha256": "another model", "max_skew": 0.0})


def test_a_retrained_older_date_stays_below_newer_dates(penguins_pipeline, tmp_path):
    """TF Serving serves the highest version: a retrain of 2025-11-25 must not overtake 2025-11-26."""
    run = penguins_pipeline
    day, next_day = 1764028800, 1764115200
    serving = tmp_path / "serving"
    for version in (day, day + 1, next_day):
        another_models_version(serving, version)

    def export(serving, version):
        return export_model(ExportArgs(run.spec, run.train.model_uri, run.adapt.state_uri, run.shard.manifest_uri,
                                       run.evaluate.metrics_uri, str(serving), version))

    assert export(serving, day).version == day + 2  # the first free second of its own day
    assert max(published_versions(str(serving))) == next_day
    last_second, full = next_day - 1, tmp_path / "full"
    another_models_version(full, last_second)
    with pytest.raises(RuntimeError, match=f"No free serving version .* from {last_second} to the end of its day"):
        export(full, last_second)


def test_an_export_that_loses_the_race_for_its_version_overwrites_nothing(penguins_pipeline, tmp_path, monkeypatch):
    """A manual trigger and the scheduled run of one date export at once: both find the same version free,
    and another model is published there first. The loser fails saying so; its retry takes the next version."""
    import tfjobs.export

    run = penguins_pipeline
    day, serving = 1764028800, tmp_path / "serving"
    args = ExportArgs(run.spec, run.train.model_uri, run.adapt.state_uri, run.shard.manifest_uri,
                      run.evaluate.metrics_uri, str(serving), day)
    scan = tfjobs.export.published_versions

    def scanned_before_the_winner_published(uri):
        versions = scan(uri)
        another_models_version(serving, day)
        return versions

    monkeypatch.setattr(tfjobs.export, "published_versions", scanned_before_the_winner_published)
    with pytest.raises(RuntimeError, match=f"Version {day} under .* was published by another run .* not overwritten"):
        export_model(args)
    assert (serving / str(day) / "saved_model.pb").read_bytes() == b"another model"
    assert [p.name for p in serving.iterdir()] == [str(day)]  # no half-copied version left beside it
    monkeypatch.setattr(tfjobs.export, "published_versions", scan)
    assert export_model(args).version == day + 1


def test_unblessed_model_is_not_exported(penguins_pipeline, tmp_path):
    run = penguins_pipeline
    metrics = read_json(run.evaluate.metrics_uri)
    metrics.update(blessed=False, failures=["accuracy 0.5 < required minimum 0.95"])
    write_json(str(tmp_path / "metrics.json"), metrics)
    args = ExportArgs(run.spec, run.train.model_uri, run.adapt.state_uri, run.shard.manifest_uri,
                      str(tmp_path / "metrics.json"), str(tmp_path / "serving"), 5)
    with pytest.raises(NotBlessedError, match="accuracy 0.5 < required minimum 0.95"):
        export_model(args)
    assert not (tmp_path / "serving").exists()


def test_predict_cli_loads_the_newest_version(penguins_pipeline):
    completed = subprocess.run(
        [sys.executable, "-m", "tfjobs.predict", "--serving", penguins_pipeline.layout.serving,
         "--instances", str(ROOT / "include" / "penguins_request.json")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    result = json.loads(completed.stdout)
    assert result["version"] == penguins_pipeline.export.version
    assert [p["classes"] for p in result["predictions"][:3]] == ["Adelie", "Chinstrap", "Gentoo"]


def test_a_rerun_of_the_date_with_other_data_cannot_be_paired_with_the_first_runs_model(penguins_spec, tmp_path):
    """Train and evaluate run 1; run 2 of the same date re-fetches other data (rewriting the partition's shards
    and state); evaluate and export of run 1, retried, refuse instead of pairing its weights with new inputs."""
    import dataclasses

    import palmerpenguins

    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.evaluate import InputMismatchError
    from tfjobs.fetch import fetch_dataset
    from tfjobs.shard import shard_dataset
    from tfjobs.spec import EvaluationSpec
    from tfjobs.storage.layout import Layout
    from tfjobs.validate import validate_dataset

    spec = dataclasses.replace(penguins_spec, evaluation=EvaluationSpec())  # blessed whatever the accuracy
    first, second = (Layout(str(tmp_path / "store"), spec.name, "2026-11-25", run=r) for r in ("r1", "r2"))

    def data_steps(layout, source):
        fetch_dataset(spec, layout.raw, source_uri=source)
        validate_dataset(spec, layout.raw, layout.validated)
        shards = shard_dataset(spec, layout.validated, layout.shards)
        return shards, adapt_preprocessing(spec, shards.manifest_uri, layout.preprocessing)

    frame = palmerpenguins.load_penguins()
    frame.to_csv(tmp_path / "day.csv", index=False)
    frame.iloc[60:].to_csv(tmp_path / "corrected.csv", index=False)
    shards, adapted = data_steps(first, str(tmp_path / "day.csv"))
    trained = train_model(TrainArgs(spec, shards.manifest_uri, adapted.state_uri, first.run_dir + "/train",
                                    hyperparameters={"epochs": 2}))
    assert read_json(trained.state_uri) == read_json(adapted.state_uri)  # the run keeps its own copy
    evaluated = evaluate_model(spec, trained.model_uri, trained.state_uri, shards.manifest_uri,
                               first.run_dir + "/evaluate")
    assert evaluated.blessed

    data_steps(second, str(tmp_path / "corrected.csv"))  # the same partition, other rows
    assert read_json(trained.state_uri) != read_json(adapted.state_uri)  # the partition's state moved on
    with pytest.raises(InputMismatchError, match=r"the shards manifest at .*manifest.json has SHA-256 .*, "
                                                  r"the model was trained with"):
        evaluate_model(spec, trained.model_uri, trained.state_uri, shards.manifest_uri, first.run_dir + "/evaluate2")
    with pytest.raises(InputMismatchError, match=r"the shards manifest .* the blessing in .*metrics.json was for"):
        export_model(ExportArgs(spec, trained.model_uri, trained.state_uri, shards.manifest_uri,
                                evaluated.metrics_uri, first.serving, 1764028800))
    # Pairing the model with the partition's new state is refused too, naming the state.
    with pytest.raises(InputMismatchError, match=r"the state at .*preprocessing.*state.json has SHA-256"):
        export_model(ExportArgs(spec, trained.model_uri, adapted.state_uri, shards.manifest_uri,
                                evaluated.metrics_uri, first.serving, 1764028800))


@pytest.mark.parametrize("kind", ["wide_deep", "residual"])
def test_subclassed_models_train_with_fit_and_the_kill_backup(penguins_pipeline, tmp_path, kind):
    """fit() keeps a BackupAndRestore backup, which needs built weights: a subclassed model is built on a batch
    first (it was not, and every tuning trial of housing's wide & deep model failed)."""
    run = penguins_pipeline
    output = str(tmp_path / kind / "train")
    trained = train_model(TrainArgs(run.spec, run.shard.manifest_uri, run.adapt.state_uri, output, model_kind=kind,
                                    hyperparameters={"epochs": 2, "loop": "fit"}))
    assert trained.rewritten and len(read_json(f"{output}/history.json")["loss"]) == 2
