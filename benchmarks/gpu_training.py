"""Keras ``fit()`` (JAX backend) against a hand-written JAX training step: same model, same data, in memory.

Run by ``bench_gpu.py`` in a fresh process with ``KERAS_BACKEND=jax``; it never imports
TensorFlow, so it runs on a GPU machine that has JAX and Keras but no TensorFlow:

    KERAS_BACKEND=jax python -m benchmarks.gpu_training --rows 4000000 --epochs 5

The model is Shardline's housing MLP (8 normalized numbers, an embedded category,
dense 64 -> 32 -> 1) built by ``tfjobs.models``; the hand-written step is the same
architecture and Adam in plain ``jax.numpy``, with the data on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

BATCH = 8192


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-execution", type=int, default=32)
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "jax":
        raise SystemExit("Run with KERAS_BACKEND=jax")
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from benchmarks.harness import fit_epoch_seconds
    from tfjobs.models import EncodedFeatures, build_training_model
    from tfjobs.spec import parse_spec

    rows = args.rows - args.rows % BATCH
    rng = np.random.default_rng(0)
    numeric = rng.normal(size=(rows, 8)).astype(np.float32)
    category = rng.integers(0, 7, rows)
    target = (numeric @ rng.normal(size=8) + 0.1 * rng.normal(size=rows)).astype(np.float32)

    spec = parse_spec({
        "name": "housing_gpu", "source": {"kind": "csv", "uri": "in-memory"},
        "label": {"name": "median_house_value", "task": "regression"},
        "features": {**{f"x{i}": {"kind": "numeric"} for i in range(8)},
                     "ocean_proximity": {"kind": "categorical", "encoding": "embedding", "embedding_dim": 4}},
        "model": {"kind": "mlp", "hidden_units": [64, 32]},
    })
    features = EncodedFeatures(numeric=8, vocabulary_sizes={"ocean_proximity": 7},
                               encodings={"ocean_proximity": "embedding"}, embedding_dims={"ocean_proximity": 4})
    model = build_training_model(spec, features)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", steps_per_execution=args.steps_per_execution,
                  jit_compile=True)
    x = {"numeric": numeric, "ocean_proximity": category}
    times = fit_epoch_seconds(model, x, args.epochs, y=target, batch_size=BATCH, shuffle=True)
    keras_rate = rows * (len(times) - 1) / sum(times[1:])

    # The same architecture and optimizer, by hand, with every batch already on the device.
    key = jax.random.PRNGKey(0)
    shapes = {"embedding": (7, 4), "w1": (12, 64), "b1": (64,), "w2": (64, 32), "b2": (32,), "w3": (32, 1), "b3": (1,)}
    params = {}
    for name, shape in shapes.items():
        key, sub = jax.random.split(key)
        params[name] = jax.random.normal(sub, shape) * (0.1 if name.startswith("w") or name == "embedding" else 0.0)

    def loss_fn(p, xn, xc, y):
        h = jnp.concatenate([xn, p["embedding"][xc]], axis=1)
        h = jax.nn.relu(h @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return jnp.mean(((h @ p["w3"] + p["b3"])[:, 0] - y) ** 2)

    @jax.jit
    def step(p, m, v, t, xn, xc, y):
        grads = jax.grad(loss_fn)(p, xn, xc, y)
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
        scale = 1e-3 * jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        p = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-7), p, m, v)
        return p, m, v

    steps = rows // BATCH
    xn = jax.device_put(numeric.reshape(steps, BATCH, 8))
    xc = jax.device_put(category.reshape(steps, BATCH))
    yy = jax.device_put(target.reshape(steps, BATCH))
    m = jax.tree.map(jnp.zeros_like, params)
    v = jax.tree.map(jnp.zeros_like, params)
    hand_times = []
    t = 0
    for _ in range(args.epochs):
        started = time.perf_counter()
        for i in range(steps):
            t += 1
            params, m, v = step(params, m, v, t, xn[i], xc[i], yy[i])
        jax.block_until_ready(params)
        hand_times.append(time.perf_counter() - started)
    hand_rate = rows * (len(hand_times) - 1) / sum(hand_times[1:])
    print(json.dumps({
        "device": str(jax.devices()[0]), "rows": rows, "batch": BATCH, "keras_fit": keras_rate,
        "hand_written_jax": hand_rate, "tensorflow_imported": "tensorflow" in sys.modules,
    }))


if __name__ == "__main__":
    main()
