"""Train a Keras model on the shards with ``fit()`` or the custom GradientTape loop.

Inputs: the shard manifest, the adapted preprocessing state and the spec (with
hyperparameter overrides, e.g. from Airflow Params). Outputs, under the run's
``train/`` prefix::

    training_model.keras     the trained model on encoded features
    checkpoints/             best weights so far (ModelCheckpoint)
    tensorboard/             TensorBoard logs
    history.json             per-epoch metrics
    training_curve.png       loss and metric curves
    training.json            summary, written last

The training setting ``loop`` picks ``fit()`` or :mod:`tfjobs.custom_loop`
(same loss, metrics, callbacks and outputs; two optimizers for a wide & deep
model); ``loss`` picks the loss (``mse`` or :class:`tfjobs.losses.HuberLoss` for
regression). A visible GPU is used with memory growth on; with several GPUs
``fit()`` runs under ``tf.distribute.MirroredStrategy``. A re-run with the same inputs and
hyperparameters rewrites nothing unless ``force`` is set.

    python -m tfjobs.train --spec include/penguins.yaml --shards <...>/manifest.json \\
        --state <...>/state.json --output <store>/runs/penguins/<run>/train --set epochs=30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tfjobs import cli
from tfjobs.spec import PipelineSpec, TrainingSpec, load_spec
from tfjobs.store import join, read_json, read_json_if_exists, staging_dir, store_for

log = logging.getLogger(__name__)

MODEL_FILE = "training_model.keras"
SUMMARY_FILE = "training.json"
CACHE_LIMIT_BYTES = 1 << 30  # cache decoded records in memory below this estimate


@dataclass(frozen=True)
class TrainArgs:
    spec: PipelineSpec
    shards_manifest_uri: str
    state_uri: str
    output_uri: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    model_kind: str = ""
    force: bool = False


@dataclass(frozen=True)
class TrainResult:
    model_uri: str
    summary_uri: str
    model_kind: str
    epochs_run: int
    best_epoch: int
    metrics: dict[str, float]
    rewritten: bool


def train_model(args: TrainArgs) -> TrainResult:
    spec = args.spec
    settings = spec.training.with_overrides(args.hyperparameters)
    kind = args.model_kind or spec.model.kind
    for uri, step in ((args.shards_manifest_uri, "shard"), (args.state_uri, "adapt")):
        if not store_for(uri).exists(uri):
            raise FileNotFoundError(f"{uri} does not exist: run the {step} step first")
    fingerprint = _fingerprint(args, settings, kind)
    summary_uri = join(args.output_uri, SUMMARY_FILE)
    previous = read_json_if_exists(summary_uri)
    if previous and previous["fingerprint"] == fingerprint and not args.force:
        log.info("Model at %s was trained on the same inputs and settings; not retraining", args.output_uri)
        return _result(args.output_uri, previous, rewritten=False)

    store = store_for(args.output_uri)
    store.delete(summary_uri)
    with staging_dir() as tmp:
        summary = _fit(spec, settings, kind, args, tmp)
        summary["fingerprint"] = fingerprint
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        store.publish_dir(tmp, args.output_uri, last=[SUMMARY_FILE])
    return _result(args.output_uri, summary, rewritten=True)


def _fingerprint(args: TrainArgs, settings: TrainingSpec, kind: str) -> str:
    digest = hashlib.sha256()
    for uri in (args.shards_manifest_uri, args.state_uri):
        digest.update(store_for(uri).read_bytes(uri))
    digest.update(json.dumps([args.spec.fingerprint(), settings.__dict__, kind], sort_keys=True).encode())
    return digest.hexdigest()


def _result(output_uri: str, summary: dict, rewritten: bool) -> TrainResult:
    return TrainResult(
        model_uri=join(output_uri, MODEL_FILE),
        summary_uri=join(output_uri, SUMMARY_FILE),
        model_kind=summary["model_kind"],
        epochs_run=summary["epochs_run"],
        best_epoch=summary["best_epoch"],
        metrics=summary["metrics"],
        rewritten=rewritten,
    )


def configure_devices():
    """Memory growth on every GPU; the distribution strategy for what is visible."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if len(gpus) > 1:
        log.info("Training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    log.info("Training on %s", "one GPU" if gpus else "the CPU")
    return tf.distribute.get_strategy()


def compile_for_task(model, spec: PipelineSpec, settings: TrainingSpec) -> None:
    """Adam, the spec's loss and the task's streaming metrics; ``fit()`` and the custom loop both use them."""
    import keras

    from tfjobs.losses import HuberLoss
    from tfjobs.metrics import HuberMetric

    loss_name = settings.loss_for(spec.label.task)
    if spec.label.task == "classification":
        loss = keras.losses.SparseCategoricalCrossentropy()
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    else:
        loss = HuberLoss(settings.huber_delta) if loss_name == "huber" else keras.losses.MeanSquaredError()
        metrics = [keras.metrics.RootMeanSquaredError(name="rmse"), HuberMetric(settings.huber_delta, name="huber")]
    jit_compile = {"auto": "auto", "true": True, "false": False}[settings.jit_compile]
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate), loss=loss, metrics=metrics, jit_compile=jit_compile
    )


def _fit(spec: PipelineSpec, settings: TrainingSpec, kind: str, args: TrainArgs, out_dir) -> dict:
    import keras

    from tfjobs.input_pipeline import local_shards, manifest_columns, raw_batches, training_batches
    from tfjobs.models import build_training_model, encoded_features
    from tfjobs.preprocessing import FeaturePreprocessor

    keras.utils.set_random_seed(settings.seed)
    strategy = configure_devices()
    if settings.loop == "custom" and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            f"The custom loop trains on one device and {strategy.num_replicas_in_sync} GPUs are visible: "
            "use loop=fit, or limit the task to one GPU (CUDA_VISIBLE_DEVICES)"
        )
    manifest = read_json(args.shards_manifest_uri)
    state = read_json(args.state_uri)
    preprocessor = FeaturePreprocessor(state)
    columns = manifest_columns(manifest)

    def dataset(split: str, files: list[str], shuffle: bool):
        size = sum(s["bytes"] for s in manifest["splits"][split]["shards"]) * 5
        raw = raw_batches(
            files,
            columns,
            settings.batch_size,
            shuffle_buffer=settings.shuffle_buffer if shuffle else 0,
            seed=settings.seed,
            cache=size < CACHE_LIMIT_BYTES,
            records=manifest["splits"][split]["records"],
        )
        return training_batches(raw, preprocessor, spec.label.name)

    with local_shards(args.shards_manifest_uri, "train") as train_files, local_shards(
        args.shards_manifest_uri, "eval"
    ) as eval_files:
        train_data = dataset("train", train_files, shuffle=True)
        eval_data = dataset("eval", eval_files, shuffle=False)
        with strategy.scope():
            model = build_training_model(spec, encoded_features(spec, preprocessor), kind)
            compile_for_task(model, spec, settings)
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=settings.early_stopping_patience, restore_best_weights=True
            ),
            keras.callbacks.ModelCheckpoint(
                str(out_dir / "checkpoints" / "best.weights.h5"),
                monitor="val_loss",
                save_best_only=True,
                save_weights_only=True,
            ),
            keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard")),
            epoch_progress(settings.epochs),
        ]
        (out_dir / "checkpoints").mkdir()
        log.info(
            "Training %s with %s on %d records (%d for validation): %s",
            kind, "the custom loop" if settings.loop == "custom" else "fit()",
            manifest["splits"]["train"]["records"], manifest["splits"]["eval"]["records"], settings,
        )
        if settings.loop == "custom":
            from tfjobs.custom_loop import fit_with_gradient_tape

            history = fit_with_gradient_tape(
                model, train_data, validation_data=eval_data, epochs=settings.epochs, callbacks=callbacks,
                wide_learning_rate=settings.wide_learning_rate,
            )
        else:
            # shuffle=False: the input pipeline already shuffles files and records each epoch.
            history = model.fit(
                train_data, validation_data=eval_data, epochs=settings.epochs, callbacks=callbacks, shuffle=False,
                verbose=0,
            )
    model.save(out_dir / MODEL_FILE)
    epochs = history.history
    (out_dir / "history.json").write_text(json.dumps(epochs, indent=2) + "\n")
    plot_training_curves(epochs, out_dir / "training_curve.png", title=f"{spec.name}: {kind}")
    best = min(range(len(epochs["val_loss"])), key=lambda i: epochs["val_loss"][i])
    return {
        "dataset": spec.name,
        "model_kind": kind,
        "loop": settings.loop,
        "settings": settings.__dict__,
        "epochs_run": len(epochs["val_loss"]),
        "best_epoch": best + 1,
        "metrics": {name: float(values[best]) for name, values in epochs.items()},
        "model_file": MODEL_FILE,
        "shards_manifest": args.shards_manifest_uri,
        "state": args.state_uri,
    }


def epoch_progress(epochs: int):
    """A Keras callback that logs one line per epoch (and so to the Airflow task log)."""
    import keras

    class EpochProgress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
            log.info("epoch %d/%d %s (%.1fs)", epoch + 1, epochs, metrics, time.perf_counter() - self.started)

    return EpochProgress()


def plot_training_curves(history: dict[str, list[float]], path, title: str) -> None:
    """Loss and each metric, training and validation, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in history if not k.startswith("val_")]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        epochs = range(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], label="eval")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """``["epochs=30", "learning_rate=0.01"]`` -> ``{"epochs": "30", ...}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--set expects name=value, got {pair!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--shards", required=True, help="URI of the shard set's manifest.json")
    parser.add_argument("--state", required=True, help="URI of the adapted preprocessing state.json")
    parser.add_argument("--output", required=True, help="output prefix URI")
    parser.add_argument("--model", default="", help="model kind (default: the spec's model.kind)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a training setting")
    parser.add_argument("--force", action="store_true", help="retrain even if the output is up to date")
    args = cli.parse(parser, argv)
    result = train_model(
        TrainArgs(
            spec=load_spec(args.spec),
            shards_manifest_uri=args.shards,
            state_uri=args.state,
            output_uri=args.output,
            hyperparameters=parse_settings(args.set),
            model_kind=args.model,
            force=args.force,
        )
    )
    cli.print_result(result)


if __name__ == "__main__":
    main()
