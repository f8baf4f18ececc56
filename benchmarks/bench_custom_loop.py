"""Step time of the custom GradientTape loop against ``fit()``, same model, same batches, same process.

The model is the housing spec's (8 numeric features, ``ocean_proximity`` embedded)
at its batch size, on encoded batches held in memory so the input pipeline costs
the same for both and as little as possible; what differs is only the loop. Each
side runs one warm-up epoch (tracing) and three timed ones, and the fastest epoch
counts: for ``fit()``, from ``on_epoch_begin`` to ``on_epoch_end`` of one
``fit(epochs=4)`` call, so its per-call setup is not charged to its steps. ``fit()``
trains with one Adam, the custom loop with SGD on the wide part and Adam on the
deep part (wide & deep) or with the compiled Adam (mlp).

Target: custom-loop step time <= 1.5x ``fit()``'s.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.harness import Target, fit_epoch_seconds
from tfjobs.features import NUMBERS

SPEC = Path(__file__).resolve().parents[1] / "include" / "housing.yaml"
GOAL = 1.5


def encoded_batches(rows: int, batch_size: int):
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    features = {
        NUMBERS: rng.normal(size=(rows, 8)).astype("float32"),
        "ocean_proximity": rng.integers(0, 6, rows).astype("int64"),
    }
    labels = (features[NUMBERS] @ rng.normal(size=8) + 0.2 * features["ocean_proximity"]).astype("float32")
    return tf.data.Dataset.from_tensor_slices((features, labels)).batch(batch_size).cache().prefetch(-1)


def build(kind: str, spec):
    import keras

    from tfjobs.modeling.models import EncodedFeatures, build_training_model
    from tfjobs.train import compile_for_task

    keras.utils.set_random_seed(0)
    features = EncodedFeatures(numeric_width=8, index_sizes={"ocean_proximity": 6},
                               encodings={"ocean_proximity": "embedding"}, embedding_dims={"ocean_proximity": 3})
    model = build_training_model(spec, features, kind)
    compile_for_task(model, spec, spec.training)
    return model


def loop_seconds_per_epoch(run_epoch, timed_epochs: int) -> float:
    """The fastest of ``timed_epochs`` epochs of the custom loop, after a warm-up epoch."""
    run_epoch()
    durations = []
    for _ in range(timed_epochs):
        started = time.perf_counter()
        run_epoch()
        durations.append(time.perf_counter() - started)
    return min(durations)


def run(quick: bool) -> list[Target]:
    from tfjobs.modeling.custom_loop import GradientTapeLoop, optimizer_groups
    from tfjobs.spec import load_spec

    spec = load_spec(SPEC)
    batch_size = spec.training.batch_size
    rows = 4096 if quick else 32768
    steps = -(-rows // batch_size)
    data = encoded_batches(rows, batch_size)
    targets = []
    for kind in ("wide_deep", "mlp"):
        with_fit = build(kind, spec)
        fit_seconds = min(fit_epoch_seconds(with_fit, 4, x=data, shuffle=False)[1:])  # after a warm-up epoch
        with_loop = build(kind, spec)
        with_loop(next(iter(data))[0])
        loop = GradientTapeLoop(with_loop, optimizer_groups(with_loop, spec.training.wide_learning_rate))
        loop_seconds = loop_seconds_per_epoch(lambda loop=loop: loop.run_epoch(data, loop.train_step), 3)
        optimizers = " + ".join(type(o).__name__ for o, _ in loop.groups)
        targets.append(Target(
            name=f"custom-loop step time, {kind}",
            measured=loop_seconds / steps * 1e3,
            anchor=fit_seconds / steps * 1e3,
            unit="ms/step",
            anchor_name="fit()",
            goal=GOAL,
            lower_is_better=True,
            note=f"batch {batch_size}, {steps} steps/epoch, fastest of 3 epochs; loop: {optimizers}; "
            f"XLA {'on' if with_loop.jit_compile else 'off'}",
        ))
    return targets
