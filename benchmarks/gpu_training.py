"""Keras ``fit()`` (JAX backend) against a hand-written JAX training step: same model, same data, one run.

Run by ``bench_gpu.py`` in a fresh process with ``KERAS_BACKEND=jax``; it never imports
TensorFlow, so it runs on a GPU machine that has JAX and Keras but no TensorFlow:

    KERAS_BACKEND=jax python -m benchmarks.gpu_training --rows 4000000 --epochs 5

The model is Shardline's housing MLP (8 normalized numbers, an embedded category,
dense 64 -> 32 -> 1) built by ``tfjobs.modeling.models``. ``fit()`` is timed as Shardline's
training job runs it under JAX: on ``tfjobs.modeling.in_memory.ShuffledBatches`` (the rows on
the device, reshuffled every epoch) stacked ``--steps-per-execution`` batches at a time,
each stack one compiled ``lax.scan`` (``tfjobs.modeling.in_memory.scan_stacked_steps``). With
``--keras-input`` it is also timed on the plain batches with Keras's own
``steps_per_execution`` (``batches``), and on arrays on the host (NumPy) or on the device
(``jax.Array``, which Keras gathers batch by batch). With several configs, the fastest
is reported as ``keras_fit`` and every one in ``keras_fit_by_config``. The anchor is
the same architecture and Adam in plain ``jax.numpy``, with the data on the device:
one jitted step per batch that slices its batch itself (one dispatch per step). A whole
epoch under ``lax.scan`` (one dispatch per epoch) is printed too, as the ceiling for
this model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BATCH = 8192
EMBEDDING_ROWS = 7


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-execution", type=int, nargs="+", default=[32],
                        help="one or more values; each trains a fresh model")
    parser.add_argument("--keras-input", nargs="+", choices=("host", "device", "batches", "stacked"),
                        default=["stacked"],
                        help="what fit() is given: NumPy arrays (host), jax.Array on the device (device), "
                             "tfjobs.modeling.in_memory.ShuffledBatches (batches), or ShuffledBatches stacked for "
                             "scan_stacked_steps (stacked)")
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax")
    import jax
    import keras
    import numpy as np

    rows = args.rows - args.rows % BATCH
    rng = np.random.default_rng(0)
    numeric = rng.normal(size=(rows, 8)).astype(np.float32)
    category = rng.integers(0, EMBEDDING_ROWS, rows).astype(np.int32)
    target = (numeric @ rng.normal(size=8) + 0.1 * rng.normal(size=rows)).astype(np.float32)

    from tfjobs.features import NUMBERS
    from tfjobs.modeling.in_memory import ShuffledBatches

    x = {NUMBERS: numeric, "ocean_proximity": category}
    fit_inputs = {
        "host": lambda steps: {"x": x, "y": target, "batch_size": BATCH, "shuffle": True},
        "device": lambda steps: {"x": jax.device_put(x), "y": jax.device_put(target), "batch_size": BATCH, "shuffle": True},
        "batches": lambda steps: {"x": ShuffledBatches(x, target, BATCH)},
        "stacked": lambda steps: {"x": ShuffledBatches(x, target, BATCH, stack_steps=steps)},
    }
    keras_rates = {}
    for given in args.keras_input:
        for steps_per_execution in args.steps_per_execution:
            rate = keras_fit_rate(fit_inputs[given](steps_per_execution), rows, args.epochs, steps_per_execution)
            keras_rates[f"{given}, steps_per_execution {steps_per_execution}"] = rate
    best = max(keras_rates, key=keras_rates.get)
    hand_written = hand_written_rates(numeric, category, target, args.epochs)
    print(json.dumps({
        "device": str(jax.devices()[0]), "rows": rows, "batch": BATCH,
        "keras_fit": keras_rates[best], "keras_fit_config": best, "keras_fit_by_config": keras_rates,
        "hand_written_jax": hand_written["step"], "hand_written_jax_scan_epoch": hand_written["scan_epoch"],
        "keras": keras.__version__, "jax": jax.__version__, "tensorflow_imported": "tensorflow" in sys.modules,
    }))


def keras_fit_rate(fit_args: dict, rows: int, epochs: int, steps_per_execution: int) -> float:
    """Examples/s of ``fit()`` on Shardline's housing model, over the epochs after the first (which compiles)."""
    import keras

    from benchmarks.harness import fit_epoch_seconds
    from tfjobs.modeling.in_memory import scan_stacked_steps
    from tfjobs.modeling.models import EncodedFeatures, build_training_model
    from tfjobs.spec import parse_spec

    spec = parse_spec({
        "name": "housing_gpu", "source": {"kind": "csv", "uri": "in-memory"},
        "label": {"name": "median_house_value", "task": "regression"},
        "features": {**{f"x{i}": {"kind": "numeric"} for i in range(8)},
                     "ocean_proximity": {"kind": "categorical", "encoding": "embedding", "embedding_dim": 4}},
        "model": {"kind": "mlp", "hidden_units": [64, 32]},
    })
    features = EncodedFeatures(numeric_width=8, index_sizes={"ocean_proximity": EMBEDDING_ROWS},
                               encodings={"ocean_proximity": "embedding"}, embedding_dims={"ocean_proximity": 4})
    model = build_training_model(spec, features)
    stacked = getattr(fit_args["x"], "stack_steps", None)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", jit_compile=True,
                  steps_per_execution=1 if stacked else steps_per_execution)
    if stacked:
        scan_stacked_steps(model, fit_args["x"])
    times = fit_epoch_seconds(model, epochs=epochs, **fit_args)
    return rows * (len(times) - 1) / sum(times[1:])


def hand_written_rates(numeric, category, target, epochs: int) -> dict[str, float]:
    """Examples/s of the same architecture and Adam in plain JAX, data on the device, after a compiling epoch."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    shapes = {"embedding": (EMBEDDING_ROWS, 4), "w1": (12, 64), "b1": (64,), "w2": (64, 32), "b2": (32,),
              "w3": (32, 1), "b3": (1,)}
    initial = {}
    for name, shape in shapes.items():
        key, sub = jax.random.split(key)
        initial[name] = jax.random.normal(sub, shape) * (0.1 if name.startswith("w") or name == "embedding" else 0.0)

    def loss_fn(p, xn, xc, y):
        h = jnp.concatenate([xn, p["embedding"][xc]], axis=1)
        h = jax.nn.relu(h @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return jnp.mean(((h @ p["w3"] + p["b3"])[:, 0] - y) ** 2)

    def update(state, batch):
        p, m, v, t = state
        grads = jax.grad(loss_fn)(p, *batch)
        t = t + 1
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
        scale = 1e-3 * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        p = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-7), p, m, v)
        return (p, m, v, t), None

    steps = len(target) // BATCH
    data = (jax.device_put(numeric.reshape(steps, BATCH, 8)), jax.device_put(category.reshape(steps, BATCH)),
            jax.device_put(target.reshape(steps, BATCH)))

    @jax.jit
    def step(state, data, i):
        return update(state, jax.tree.map(lambda d: d[i], data))[0]

    @jax.jit
    def epoch(state, data):
        return jax.lax.scan(update, state, data)[0]

    def one_epoch_by_steps(state):
        for i in range(steps):
            state = step(state, data, i)
        return state

    rates = {}
    for name, run_epoch in (("step", one_epoch_by_steps), ("scan_epoch", lambda state: epoch(state, data))):
        zeros = jax.tree.map(jnp.zeros_like, initial)
        state = (initial, zeros, zeros, jnp.zeros((), jnp.float32))
        times = []
        for _ in range(epochs):
            started = time.perf_counter()
            state = jax.block_until_ready(run_epoch(state))
            times.append(time.perf_counter() - started)
        rates[name] = len(target) * (len(times) - 1) / sum(times[1:])
    return rates


if __name__ == "__main__":
    main()
