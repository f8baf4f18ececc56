"""Train a Keras model on the shards with ``fit()`` or the custom GradientTape loop.

Inputs: the shard manifest, the adapted preprocessing state and the spec (with
hyperparameter overrides, e.g. from Airflow Params). Outputs, under the run's
``train/`` prefix::

    training_model.keras     the trained model on encoded features
    state.json               a copy of the preprocessing state it was trained with (evaluate and export use it)
    checkpoints/             the best epoch's weights (best.weights.h5; the model holds them too)
    tensorboard/             TensorBoard logs
    history.json             per-epoch metrics
    training_curve.png       loss and metric curves
    training.json            summary, written last

The training setting ``loop`` picks ``fit()`` or :mod:`tfjobs.modeling.custom_loop`
(same loss, metrics, callbacks and outputs; two optimizers for a wide & deep
model); ``loss`` picks the loss (``mse`` or :class:`tfjobs.modeling.losses.HuberLoss` for
regression). A visible GPU is used with memory growth on; with several GPUs
``fit()`` runs under ``tf.distribute.MirroredStrategy``. Under another Keras backend
(``KERAS_BACKEND=jax``), ``fit()`` reads the preprocessed rows into memory once, when
they fit, and trains from :class:`tfjobs.modeling.in_memory.ShuffledBatches` (on the GPU under
JAX) rather than converting a tf.data batch on the host every step; under JAX it runs
``STACKED_STEPS`` steps per compiled call (:func:`tfjobs.modeling.in_memory.scan_stacked_steps`).
A re-run with the same inputs and hyperparameters rewrites nothing unless ``force`` is set.

Tuned settings (``tuned_settings``, from :mod:`tfjobs.tune`) are applied to the spec first, the
explicit ``hyperparameters`` and ``model_kind`` over them. When ``reuse_uri`` names a trial's
outputs trained on the same inputs with the same settings, they are copied instead of retraining.

Beyond one machine: when ``TF_CONFIG`` describes a cluster of several tasks, the
same command runs on every task under ``tf.distribute.MultiWorkerMirroredStrategy``
(one process per machine or pod, each with the same arguments and its own
``TF_CONFIG``). Every worker reads every shard and keeps its share of the batches;
only the chief (``chief`` 0, or ``worker`` 0 when the cluster has no chief)
publishes checkpoints, logs and the model, the others train in a throwaway
directory::

    TF_CONFIG='{"cluster": {"worker": ["host-a:12345", "host-b:12345"]},
                "task": {"type": "worker", "index": 0}}' python -m tfjobs.train ...

    python -m tfjobs.train --spec include/penguins.yaml --shards <...>/manifest.json \\
        --state <...>/state.json --output <store>/runs/penguins/<run>/train --set epochs=30
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tfjobs import cli
from tfjobs.spec import PipelineSpec, TrainingSpec, load_spec, tuned_state
from tfjobs.storage.store import (join, local_dir_copy, read_json_if_exists, staging_dir, still_linked, store_for,
                                  write_file_atomically)

log = logging.getLogger(__name__)

MODEL_FILE = "training_model.keras"
SUMMARY_FILE = "training.json"
#: The preprocessing state the model was trained with, copied into the run: evaluate and export use this copy.
STATE_FILE = "state.json"
CACHE_LIMIT_BYTES = 2 << 30  # keep preprocessed rows in memory after the first epoch below this
STACKED_STEPS = 32  # under JAX, training steps per compiled call (tfjobs.modeling.in_memory.scan_stacked_steps)


@dataclass(frozen=True)
class TrainArgs:
    spec: PipelineSpec
    shards_manifest_uri: str
    state_uri: str
    output_uri: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    model_kind: str = ""
    force: bool = False
    # Spec settings found by a search ({"training.learning_rate": 0.01, ...}), applied under the above.
    tuned_settings: dict[str, Any] = field(default_factory=dict)
    # An earlier training's outputs (a tuning trial's): taken as they are if trained on the same inputs and settings.
    reuse_uri: str = ""
    # Extra Keras callbacks (a tuning trial's report to its study); they do not change what is trained.
    callbacks: tuple = ()


@dataclass(frozen=True)
class ClusterTask:
    """This process's place in a multi-worker cluster, from ``TF_CONFIG``."""

    task_type: str
    index: int
    cluster: dict[str, list[str]]

    @property
    def is_chief(self) -> bool:
        if "chief" in self.cluster:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.index == 0

    @property
    def name(self) -> str:
        return f"{self.task_type}:{self.index}"


def cluster_task(tf_config: str | None = None) -> ClusterTask | None:
    """The task ``TF_CONFIG`` describes, or None when there is no cluster of several tasks."""
    tf_config = os.environ.get("TF_CONFIG", "") if tf_config is None else tf_config
    if not tf_config.strip():
        return None
    try:
        config = json.loads(tf_config)
        cluster = {kind: list(addresses) for kind, addresses in config["cluster"].items()}
        task = ClusterTask(str(config["task"]["type"]), int(config["task"]["index"]), cluster)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"TF_CONFIG must be JSON like {{\"cluster\": {{\"worker\": [\"host:port\", ...]}}, "
            f"\"task\": {{\"type\": \"worker\", \"index\": 0}}}}: {type(err).__name__} {err}"
        ) from None
    addresses = cluster.get(task.task_type, [])
    if not 0 <= task.index < len(addresses):
        raise ValueError(f"TF_CONFIG's task {task.name} is not in its cluster {cluster}")
    if sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")) < 2:
        return None
    return task


@dataclass(frozen=True)
class TrainResult:
    model_uri: str
    state_uri: str  # the run's copy of the preprocessing state the model was trained with
    summary_uri: str
    tensorboard_uri: str
    model_kind: str
    epochs_run: int
    best_epoch: int
    metrics: dict[str, float]
    rewritten: bool


def train_model(args: TrainArgs) -> TrainResult:
    spec = args.spec.with_settings(args.tuned_settings)
    settings = spec.training.with_overrides(args.hyperparameters)
    kind = args.model_kind or spec.model.kind
    for uri, step in ((args.shards_manifest_uri, "shard"), (args.state_uri, "adapt")):
        if not store_for(uri).exists(uri):
            raise FileNotFoundError(f"{uri} does not exist: run the {step} step first")
    fingerprint = _fingerprint(args, spec, settings, kind)
    if cluster_task() is not None:  # the cluster's workers train together
        return _train(args, spec, settings, kind, fingerprint)
    with one_training_at_a_time(backup_dir(args.output_uri, fingerprint)):
        return _train(args, spec, settings, kind, fingerprint)


def _train(args: TrainArgs, spec: PipelineSpec, settings: TrainingSpec, kind: str, fingerprint: str) -> TrainResult:
    summary_uri = join(args.output_uri, SUMMARY_FILE)
    previous = read_json_if_exists(summary_uri)
    if previous and previous["fingerprint"] == fingerprint and not args.force:
        log.info("Model at %s was trained on the same inputs and settings; not retraining", args.output_uri)
        return _result(args.output_uri, previous, rewritten=False)
    reusable = read_json_if_exists(join(args.reuse_uri, SUMMARY_FILE)) if args.reuse_uri else None
    if reusable and reusable["fingerprint"] == fingerprint:
        log.info("%s was trained on the same inputs with the same settings: copying it to %s",
                 args.reuse_uri, args.output_uri)
        with local_dir_copy(args.reuse_uri) as trained:
            store_for(args.output_uri).publish_dir(trained, args.output_uri, last=[SUMMARY_FILE], staged=False)
        return _result(args.output_uri, reusable, rewritten=True)

    task = cluster_task()
    publishes = task is None or task.is_chief
    store = store_for(args.output_uri)
    if publishes:
        store.delete(summary_uri)
    # The run keeps the state it trains with and the hash of the shards it reads: another run of the same
    # partition may rewrite both, and evaluate and export must pair these weights with these inputs.
    state_bytes = store_for(args.state_uri).read_bytes(args.state_uri)
    if any(name.startswith("features.") for name in args.tuned_settings):
        # The run keeps the state as trained: with the tuned feature options (embedding widths) in it.
        state_bytes = json.dumps(tuned_state(json.loads(state_bytes), args.tuned_settings), indent=2).encode()
    inputs = {
        "shards_manifest": args.shards_manifest_uri,
        "shards_manifest_sha256": hashlib.sha256(store_for(args.shards_manifest_uri).read_bytes(
            args.shards_manifest_uri)).hexdigest(),
        "state": args.state_uri,
        "state_sha256": hashlib.sha256(state_bytes).hexdigest(),
    }
    # A retry after a kill goes on from the last finished epoch: the backup outlives the process (it is
    # no staging directory) on local disk, keyed by the output and everything the training depends on.
    backup = backup_dir(args.output_uri, fingerprint) if settings.loop == "fit" and task is None else None
    with staging_dir() as tmp:
        (tmp / STATE_FILE).write_bytes(state_bytes)
        summary = _fit(spec, settings, kind, args, tmp, json.loads(state_bytes), backup)
        summary["inputs"] = inputs
        summary["fingerprint"] = fingerprint
        summary["tuned_settings"] = args.tuned_settings
        summary["cluster_task"] = task.name if task else None
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if not publishes:
            # Every worker trains the same replicated model; only the chief's copy is kept.
            log.info("Task %s is not the chief: its outputs in %s are thrown away", task.name, tmp)
            return _result(args.output_uri, summary, rewritten=False)
        # Readers wait for training.json alone: no staged copy needed (it would double the requests).
        store.publish_dir(tmp, args.output_uri, last=[SUMMARY_FILE], staged=False)
        log.info("Published the training outputs to %s", args.output_uri)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return _result(args.output_uri, summary, rewritten=True)


def backup_dir(output_uri: str, fingerprint: str) -> Path:
    """Where a training run backs up its last finished epoch: the same path for a retry of the same run."""
    key = hashlib.sha256(f"{output_uri}\n{fingerprint}".encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / f"shardline-train-backup-{key}"


@contextlib.contextmanager
def one_training_at_a_time(backup: Path) -> Iterator[None]:
    """Hold an exclusive lock for ``backup`` (a training of one output with one fingerprint) on this machine.

    Two runs of the same date (the scheduled run and a manual trigger) train the same model into the
    same output, and would share the backup: each would write its epochs over the other's and resume
    from the other's half-written weights. The second waits for the first, then finds its
    ``training.json`` up to date and trains nothing. The lock file (``.<backup name>.lock``, not matched
    by the staging directories' reclaimer) is removed by its holder; a waiter that then holds the lock of
    a removed file takes the new one.
    """
    lock_path = backup.with_name(f".{backup.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Another process on this machine is training the same model into the same output; "
                         "waiting for it (%s)", lock_path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if still_linked(fd, lock_path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


def resumable(backup: Path) -> list:
    """Callbacks that back up each finished epoch and, in a retry, resume after the last one.

    Keras's ``BackupAndRestore`` keeps the weights, the optimizer and the epoch count (two copies:
    a kill while it writes one leaves the other); the history of the epochs already run is kept
    beside it, so the retry's history and summary cover every epoch. EarlyStopping's count is kept
    too (:func:`early_stopping`). Each keeps what it needs per finished epoch, written before that
    epoch's backup, and takes up at the epoch the backup resumes at (the first ``on_epoch_begin``).
    """
    import keras

    class EpochHistory(keras.callbacks.Callback):
        """The finished epochs' metrics, in ``history.json`` beside the backup (written before it)."""

        def __init__(self):
            super().__init__()
            self.path = backup / "history.json"
            self.epochs: dict[str, list[float]] = {}
            self.resumed = False

        def on_train_begin(self, logs=None):
            self.resumed = False
            if self.path.exists():
                self.epochs = json.loads(self.path.read_text())

        def on_epoch_begin(self, epoch, logs=None):
            if not self.resumed:  # as many epochs as the restored weights have (the older backup's, if it fell back)
                self.resumed = True
                self.epochs = {k: v[:epoch] for k, v in self.epochs.items()}
                if epoch:
                    log.info("Resuming after epoch %d from the backup in %s", epoch, backup)

        def on_epoch_end(self, epoch, logs=None):
            for name, value in (logs or {}).items():
                self.epochs.setdefault(name, []).append(float(value))
            write_file_atomically(self.path, json.dumps(self.epochs).encode())

    class BackupOrFail(keras.callbacks.BackupAndRestore):
        """Keras falls back to the older copy when the newer cannot be read; when neither can, the
        backup goes and the try fails (a retry trains from the first epoch) rather than every retry
        failing on it."""

        def on_train_begin(self, logs=None):
            try:
                super().on_train_begin(logs)
            except (OSError, ValueError, KeyError) as err:
                raise unreadable_backup(backup, err) from err

    return [EpochHistory(), BackupOrFail(str(backup), double_checkpoint=True, delete_checkpoint=False)]


class UnreadableBackupError(RuntimeError):
    """A training backup that cannot be read was removed; a retry (the task's next try) starts afresh."""


def unreadable_backup(backup: Path, err: Exception) -> UnreadableBackupError:
    shutil.rmtree(backup, ignore_errors=True)
    return UnreadableBackupError(
        f"The training backup in {backup} cannot be read ({type(err).__name__}: {err}); it is removed, and the "
        "next try trains from the first epoch")


EARLY_STOPPING_FILE = "early_stopping.json"


def early_stopping(patience: int, backup: Path | None):
    """EarlyStopping on ``val_loss`` with the best weights restored; with a ``backup``, its count survives a kill.

    Keras's EarlyStopping starts again at each ``fit()``: after a resume its wait count, best value
    and best weights would be those of the resumed epochs alone, so a retry would train ``patience``
    epochs more than the uninterrupted run and could restore a worse epoch's weights. With ``backup``
    it writes ``early_stopping.json`` (wait, best, best epoch, stopped epoch, for each finished epoch)
    and the best weights (``early_stopping-<epoch>.npz``, one per improvement, the two latest kept) at each
    epoch's end, before the epoch's backup, and takes them up again for the epoch training resumes at.
    """
    import keras

    if backup is None:
        return keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            self.states = _early_stopping_states(backup)
            self.first_epoch = True
            # Before any epoch: a fit() left with no epoch to run (it had stopped) restores the best weights too.
            self._take_up(_backed_up_epochs(backup))

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch and epoch != self.resumed_at:  # the backup fell back to its older copy
                self._take_up(epoch)
            self.first_epoch = False

        def _take_up(self, finished: int | None):
            super().on_train_begin()
            self.resumed_at = finished
            state = self.states.get(str(finished)) if finished else None
            if finished and state is None:
                log.warning("The backup in %s has no EarlyStopping state for epoch %d: its patience counts again",
                            backup, finished)
            if state is None:
                return
            self.wait, self.best, self.best_epoch = state["wait"], state["best"], state["best_epoch"]
            self.stopped_epoch = state["stopped_epoch"]
            import numpy as np

            try:
                with np.load(backup / f"early_stopping-{self.best_epoch}.npz") as saved:
                    self.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]
            except (OSError, ValueError, KeyError) as err:
                raise unreadable_backup(backup, err) from err
            log.info("EarlyStopping resumes after epoch %d: best val_loss %.6g at epoch %d, %d epoch(s) without "
                     "improvement (patience %d)", finished, self.best, self.best_epoch + 1, self.wait, self.patience)

        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            if self.best_weights is not None:
                weights = backup / f"early_stopping-{self.best_epoch}.npz"
                if self.best_epoch == epoch or not weights.exists():  # (a killed try may have left another's)
                    _write_npz_atomically(weights, self.best_weights)
            self.states[str(epoch + 1)] = {
                "wait": self.wait, "best": None if self.best is None else float(self.best),
                "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch,
            }
            write_file_atomically(backup / EARLY_STOPPING_FILE, json.dumps(self.states).encode())
            # The weights the two latest states name (the backup falls back to the older one) are all a retry needs.
            keep = {f"early_stopping-{s['best_epoch']}.npz" for k, s in self.states.items() if int(k) >= epoch}
            for old in backup.glob("early_stopping-*.npz"):
                if old.name not in keep:
                    old.unlink()

    return ResumableEarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)


def stopped_early(backup: Path | None) -> int | None:
    """The number of epochs a backed-up run had finished when EarlyStopping stopped it; None if it had not."""
    if backup is None:
        return None
    finished = _backed_up_epochs(backup)
    state = _early_stopping_states(backup).get(str(finished)) if finished else None
    return finished if state and state["stopped_epoch"] else None


def _backed_up_epochs(backup: Path) -> int | None:
    try:
        return json.loads((backup / "training_metadata.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return None


def _early_stopping_states(backup: Path) -> dict:
    try:
        return json.loads((backup / EARLY_STOPPING_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_npz_atomically(path: Path, arrays: list) -> None:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **{f"w{i}": a for i, a in enumerate(arrays)})
    write_file_atomically(path, buffer.getvalue())


def _fingerprint(args: TrainArgs, spec: PipelineSpec, settings: TrainingSpec, kind: str) -> str:
    digest = hashlib.sha256()
    for uri in (args.shards_manifest_uri, args.state_uri):
        digest.update(store_for(uri).read_bytes(uri))
    digest.update(json.dumps([spec.fingerprint(), settings.__dict__, kind], sort_keys=True).encode())
    return digest.hexdigest()


def _result(output_uri: str, summary: dict, rewritten: bool) -> TrainResult:
    return TrainResult(
        model_uri=join(output_uri, MODEL_FILE),
        state_uri=join(output_uri, STATE_FILE),
        summary_uri=join(output_uri, SUMMARY_FILE),
        tensorboard_uri=join(output_uri, "tensorboard"),
        model_kind=summary["model_kind"],
        epochs_run=summary["epochs_run"],
        best_epoch=summary["best_epoch"],
        metrics=summary["metrics"],
        rewritten=rewritten,
    )


def read_into_memory(batches) -> tuple:
    """Every ``(features, target)`` batch of a finite dataset, joined into NumPy arrays of all its rows."""
    import keras
    import numpy as np

    parts = list(batches.as_numpy_iterator())
    if not parts:
        raise ValueError("The dataset has no batches to read into memory")
    return keras.tree.map_structure(lambda *pieces: np.concatenate(pieces), *parts)


def configure_devices():
    """Memory growth on every GPU; the distribution strategy for the cluster and what is visible.

    Call it before any other TensorFlow operation: a multi-worker strategy must
    configure the runtime's collectives before the runtime starts.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    task = cluster_task()
    if task is not None:
        log.info("Training as %s of the cluster %s with MultiWorkerMirroredStrategy", task.name, task.cluster)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(gpus) > 1:
        log.info("Training on %d GPUs with MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    log.info("Training on %s", "one GPU" if gpus else "the CPU")
    return tf.distribute.get_strategy()


def enable_determinism() -> None:
    """Deterministic kernels from here on, in this process (``training.deterministic``).

    With the seed set (``keras.utils.set_random_seed``) and the input pipeline in a fixed order,
    the same inputs and settings give the same weights. TensorFlow's kernels only: under another
    backend the seed and the input order still apply (JAX on a GPU has its own switch,
    ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``).
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def compile_for_task(model, spec: PipelineSpec, settings: TrainingSpec) -> None:
    """Adam, the spec's loss and the task's streaming metrics; ``fit()`` and the custom loop both use them."""
    import keras

    from tfjobs.modeling.losses import HuberLoss
    from tfjobs.modeling.metrics import HuberMetric

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


def _fit(spec: PipelineSpec, settings: TrainingSpec, kind: str, args: TrainArgs, out_dir, state: dict,
         backup: Path | None = None) -> dict:
    import keras

    from tfjobs.storage.input_pipeline import open_shards, training_batches
    from tfjobs.modeling.models import build_training_model, encoded_features
    from tfjobs.features.preprocessing import FeaturePreprocessor

    strategy = configure_devices()
    multi_worker = cluster_task() is not None
    if settings.loop == "custom" and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            f"The custom loop trains on one device and {strategy.num_replicas_in_sync} replicas are in sync: "
            "use loop=fit, or limit the task to one GPU (CUDA_VISIBLE_DEVICES) and one worker"
        )
    keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        enable_determinism()
    preprocessor = FeaturePreprocessor(state)

    def fits_in_memory(shards) -> bool:
        return shards.records * preprocessor.encoded_row_bytes() < CACHE_LIMIT_BYTES

    # Keras on another backend (JAX) would convert every tf.data batch on the host and copy it
    # to the device: when the preprocessed rows fit in memory, it trains from there instead.
    from_memory = keras.backend.backend() != "tensorflow" and settings.loop == "fit" and not multi_worker

    def dataset(shards, for_training: bool):
        """Training data is shuffled (and, from memory under JAX, stacked); validation data is neither."""
        if from_memory and fits_in_memory(shards):
            from tfjobs.modeling.in_memory import ShuffledBatches

            batches = training_batches(shards, preprocessor, spec.label.name, settings.batch_size)
            features, target = read_into_memory(batches)
            stack = STACKED_STEPS if for_training and keras.backend.backend() == "jax" else None
            return ShuffledBatches(features, target, settings.batch_size, seed=settings.seed, shuffle=for_training,
                                   stack_steps=stack)
        batches = training_batches(
            shards,
            preprocessor,
            spec.label.name,
            settings.batch_size,
            shuffle_rows=settings.shuffle_buffer if for_training else 0,
            seed=settings.seed,
            cache=fits_in_memory(shards),
            deterministic=settings.deterministic,
        )
        return shard_by_batch(batches) if multi_worker else batches

    with open_shards(args.shards_manifest_uri, "train") as train_shards, open_shards(
        args.shards_manifest_uri, "eval"
    ) as eval_shards:
        train_data = dataset(train_shards, for_training=True)
        eval_data = dataset(eval_shards, for_training=False)
        train_input = "memory" if isinstance(train_data, keras.utils.PyDataset) else "tf.data"
        with strategy.scope():
            model = build_training_model(spec, encoded_features(preprocessor), kind)
            compile_for_task(model, spec, settings)
        if getattr(train_data, "stack_steps", None):
            from tfjobs.modeling.in_memory import scan_stacked_steps

            scan_stacked_steps(model, train_data)
        if multi_worker:
            adapt_fit_to_multi_worker(model, strategy, next(iter(train_data)))
        resume = resumable(backup) if backup is not None else []
        if resume and not model.built:  # BackupAndRestore needs the weights: a subclassed model builds on a batch
            features, _ = eval_data[0] if isinstance(eval_data, keras.utils.PyDataset) else next(iter(eval_data))
            model(features)
        callbacks = [
            early_stopping(settings.early_stopping_patience, backup),
            keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard")),
            epoch_progress(settings.epochs),
            *args.callbacks,
            *resume,
        ]
        (out_dir / "checkpoints").mkdir()
        log.info(
            "Training %s with %s on %d records (%d for validation, shards read %s, batches from %s): %s",
            kind, "the custom loop" if settings.loop == "custom" else "fit()",
            train_shards.records, eval_shards.records, train_shards.mode, train_input, settings,
        )
        if settings.loop == "custom":
            from tfjobs.modeling.custom_loop import fit_with_gradient_tape

            history = fit_with_gradient_tape(
                model, train_data, validation_data=eval_data, epochs=settings.epochs, callbacks=callbacks,
                wide_learning_rate=settings.wide_learning_rate,
            )
        else:
            # shuffle=False: the input pipeline already shuffles files and records each epoch.
            # A retry of a run that EarlyStopping had stopped (killed while it saved or published) runs no epoch more.
            history = model.fit(
                train_data, validation_data=eval_data, epochs=stopped_early(backup) or settings.epochs,
                callbacks=callbacks, shuffle=False,
                verbose=0,
            )
    model.save(out_dir / MODEL_FILE)
    # The best epoch's weights, which EarlyStopping has restored: what a ModelCheckpoint(save_best_only) would
    # have left, but also after a resume (a ModelCheckpoint's best would be the resumed epochs' alone).
    model.save_weights(out_dir / "checkpoints" / "best.weights.h5")
    epochs = resume[0].epochs if resume else history.history  # every epoch, those before a resume included
    (out_dir / "history.json").write_text(json.dumps(epochs, indent=2) + "\n")
    plot_training_curves(epochs, out_dir / "training_curve.png", title=f"{spec.name}: {kind}")
    best = min(range(len(epochs["val_loss"])), key=lambda i: epochs["val_loss"][i])
    return {
        "dataset": spec.name,
        "model_kind": kind,
        "loop": settings.loop,
        "input": train_input,
        "steps_per_call": getattr(train_data, "stack_steps", None) or 1,
        "backend": keras.backend.backend(),
        "settings": settings.__dict__,
        "epochs_run": len(epochs["val_loss"]),
        "best_epoch": best + 1,
        "metrics": {name: float(values[best]) for name, values in epochs.items()},
        "model_file": MODEL_FILE,
        "state_file": STATE_FILE,
    }


def adapt_fit_to_multi_worker(model, strategy, batch) -> None:
    """Work around two Keras 3 bugs that break ``fit()`` under MultiWorkerMirroredStrategy.

    1. ``fit()`` builds the loss, metrics and optimizer from a batch averaged across
       workers, which fails for dict inputs (keras-team/keras#20329): build them
       from one local batch beforehand.
    2. ``fit()`` averages each step's metrics across workers along axis 0, which a
       scalar does not have (Keras 3 and this strategy: keras-team/keras#20585):
       give them that axis.
    """
    import tensorflow as tf

    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None

    def with_worker_axis(step):
        def step_with_worker_axis(data):
            return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

        return step_with_worker_axis

    model.train_step = with_worker_axis(model.train_step)
    model.test_step = with_worker_axis(model.test_step)


def shard_by_batch(dataset):
    """Each worker reads every shard and keeps its share of the batches.

    Sharding by file, the default, would leave workers without data when a split has
    fewer shards than the cluster has workers (the penguins' eval split has one), and
    would contradict the record count the input pipeline asserts from the manifest.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


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
