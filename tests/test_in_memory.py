"""tfjobs.modeling.in_memory: ShuffledBatches gives every row once per epoch, a new order each epoch, the same
batches under TensorFlow and JAX for one seed, and fit() trains on it under both; stacked, its items
hold the same batches, and scan_stacked_steps trains on them exactly as fit() on the batches one by one."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT

from tfjobs.modeling.in_memory import ShuffledBatches, scan_stacked_steps

ROWS, BATCH = 23, 5


def small_data():
    x = {"numbers": np.arange(ROWS * 2, dtype=np.float32).reshape(ROWS, 2), "ids": np.arange(ROWS, dtype=np.int32)}
    return x, np.arange(ROWS, dtype=np.float32) * 10


def epochs_of_ids(batches: ShuffledBatches, epochs: int) -> list[list[list[int]]]:
    """The ``ids`` of each batch, epoch by epoch, read the way fit() reads a PyDataset; a stack of
    batches (``stack_steps``) is split back into its batches."""
    seen = []
    for _ in range(epochs):
        batches.on_epoch_begin()
        epoch = []
        for i in range(len(batches)):
            item = batches[i]
            if batches.stack_steps:
                steps = {np.shape(leaf)[0] for leaf in keras.tree.flatten(item)}
                assert len(steps) == 1  # every array stacks the same batches
                plain = [keras.tree.map_structure(lambda stack: stack[step], item) for step in range(steps.pop())]
            else:
                plain = [item]
            for x, y in plain:
                ids = np.asarray(x["ids"]).tolist()
                assert np.asarray(x["numbers"]).tolist() == [[2 * j, 2 * j + 1] for j in ids]  # rows stay whole
                assert np.asarray(y).tolist() == [10 * j for j in ids]
                epoch.append(ids)
        batches.on_epoch_end()
        seen.append(epoch)
    return seen


def test_every_row_once_per_epoch_in_a_new_order_with_the_short_batch_kept():
    epochs = epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3), 3)
    for epoch in epochs:
        assert [len(batch) for batch in epoch] == [5, 5, 5, 5, 3]
        assert sorted([i for batch in epoch for i in batch]) == list(range(ROWS))
    orders = [[i for batch in epoch for i in batch] for epoch in epochs]
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(ROWS))
    assert epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3), 3) == epochs  # the seed decides
    assert epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=4), 1)[0] != epochs[0]


def test_without_shuffle_the_rows_keep_their_order():
    (epoch,) = epochs_of_ids(ShuffledBatches(*small_data(), BATCH, shuffle=False), 1)
    assert [i for batch in epoch for i in batch] == list(range(ROWS))


def test_bad_input_is_refused_with_what_is_wrong():
    x, y = small_data()
    with pytest.raises(ValueError, match=r"same number of rows.*\[22, 23\]"):
        ShuffledBatches(x, y[:-1], BATCH)
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        ShuffledBatches(x, y, 0)
    with pytest.raises(ValueError, match="at least one row"):
        ShuffledBatches({"ids": np.zeros(0)}, np.zeros(0), BATCH)
    with pytest.raises(ValueError, match="stack_steps must be at least 1, got 0"):
        ShuffledBatches(x, y, BATCH, stack_steps=0)
    with pytest.raises(ValueError, match="shuffle_on_device needs KERAS_BACKEND=jax, not 'tensorflow'"):
        ShuffledBatches(x, y, BATCH, shuffle_on_device=True)


@pytest.mark.parametrize("stack_steps, stacks", [(2, [2, 2, 1]), (4, [4, 1]), (1, [1, 1, 1, 1, 1])])
def test_stacks_hold_the_same_batches_in_the_same_order(stack_steps, stacks):
    batches = ShuffledBatches(*small_data(), BATCH, seed=3, stack_steps=stack_steps)
    assert [np.shape(batches[i][1])[0] for i in range(len(batches))] == stacks  # the short batch stands alone
    assert epochs_of_ids(batches, 2) == epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3), 2)


FIT_ON_BATCHES = """
import json, sys
import keras, numpy as np
from tfjobs.modeling.in_memory import ShuffledBatches
sys.path.insert(0, "tests")
from test_in_memory import BATCH, epochs_of_ids, small_data
batches = ShuffledBatches(*small_data(), BATCH, seed=3)
order = epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3), 2)
first_type = type(batches[0][1]).__module__
rng = np.random.default_rng(0)
x = rng.normal(size=(2000, 4)).astype("float32")
y = x @ np.array([1.0, -2.0, 0.5, 3.0], "float32")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=4)
history = model.fit(ShuffledBatches(x, y, 64, seed=1), epochs=5, verbose=0).history
stacked = epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3, stack_steps=2), 2)
on_device = {}
if keras.backend.backend() == "jax":  # the order drawn with jax.random, as on a GPU
    on_device = {name: epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=seed, shuffle_on_device=True), 2)
                 for name, seed in (("3", 3), ("3 again", 3), ("4", 4))}
    on_device["stacked"] = epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3, stack_steps=2,
                                                     shuffle_on_device=True), 2)
print(json.dumps({"backend": keras.backend.backend(), "order": order, "array_module": first_type,
                  "stacked": stacked, "on_device": on_device, "loss": history["loss"]}))
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_fit_trains_on_it_and_one_seed_gives_the_same_batches_on_every_backend(backend):
    if backend == "jax":
        pytest.importorskip("jax")
    completed = subprocess.run(
        [sys.executable, "-c", FIT_ON_BATCHES], capture_output=True, text=True, cwd=ROOT, check=False,
        env={**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["backend"] == backend
    assert result["order"] == epochs_of_ids(ShuffledBatches(*small_data(), BATCH, seed=3), 2)
    assert result["stacked"] == result["order"]  # stacked on the device too, the same batches
    if backend == "jax":
        # epochs_of_ids checked each batch's rows; here every row once per epoch, a new order per
        # epoch and per seed, the same for the same seed, stacked or not
        orders = {seed: [[i for batch in epoch for i in batch] for epoch in epochs]
                  for seed, epochs in result["on_device"].items()}
        assert all(sorted(order) == list(range(ROWS)) for epochs in orders.values() for order in epochs)
        assert orders["3"][0] != orders["3"][1] and orders["3"][0] != orders["4"][0]
        assert orders["3 again"] == orders["3"]
        assert orders["3"] != [[i for batch in epoch for i in batch] for epoch in result["order"]]  # not NumPy's
        assert result["on_device"]["stacked"] == result["on_device"]["3"]
    # Under JAX the batches are cut on the device (jax arrays), elsewhere they are NumPy.
    assert result["array_module"].startswith("jax" if backend == "jax" else "numpy")
    assert result["loss"][-1] < 0.01 * result["loss"][0]
    assert keras.backend.backend() == "tensorflow"  # this process was not switched


SCAN_AGAINST_FIT = """
import json
import keras, numpy as np
from tfjobs.modeling.in_memory import ShuffledBatches, scan_stacked_steps
rng = np.random.default_rng(0)
x = {"a": rng.normal(size=(1003, 4)).astype("float32"), "b": rng.integers(0, 5, 1003).astype("int32")}
y = (x["a"] @ np.array([1.0, -2.0, 0.5, 3.0], "float32") + x["b"]).astype("float32")

def build(steps_per_execution=1):
    keras.utils.set_random_seed(0)
    a, b = keras.Input((4,), name="a"), keras.Input((), dtype="int32", name="b")
    h = keras.layers.Concatenate()([a, keras.layers.Embedding(5, 2)(b)])
    h = keras.layers.Dropout(0.2)(keras.layers.Dense(8, activation="relu")(h))  # its seed state goes through the scan
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(h))
    model.compile(keras.optimizers.Adam(0.01), "mse", metrics=[keras.metrics.RootMeanSquaredError()],
                  steps_per_execution=steps_per_execution)
    return model

def train(model, batches):
    history = model.fit(batches, epochs=3, shuffle=False, verbose=0,
                        validation_data=ShuffledBatches(x, y, 64, shuffle=False)).history
    return history, model.get_weights()

plain_history, plain_weights = train(build(), ShuffledBatches(x, y, 64, seed=1))
stacked_model, stacks = build(), ShuffledBatches(x, y, 64, seed=1, stack_steps=4)
scan_stacked_steps(stacked_model, stacks)
stacked_history, stacked_weights = train(stacked_model, stacks)
errors = []
for model, batches in ((build(4), stacks), (build(), ShuffledBatches(x, y, 64))):
    try:
        scan_stacked_steps(model, batches)
    except ValueError as error:
        errors.append(str(error))
print(json.dumps({
    "plain": plain_history, "stacked": stacked_history, "stacks_per_epoch": len(stacks),
    "weights_differ_by": max(float(np.abs(p - s).max()) for p, s in zip(plain_weights, stacked_weights)),
    "steps": int(stacked_model.optimizer.iterations.numpy()), "errors": errors,
}))
"""


def test_stacked_steps_train_exactly_as_fit_on_the_batches_one_by_one():
    pytest.importorskip("jax")
    completed = subprocess.run(
        [sys.executable, "-c", SCAN_AGAINST_FIT], capture_output=True, text=True, cwd=ROOT, check=False,
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["stacks_per_epoch"] == 5  # 15 whole batches of 64 in stacks of 4, 4, 4, 3; the 43 rows left alone
    assert result["steps"] == 3 * 16
    assert result["weights_differ_by"] < 1e-5
    assert result["stacked"].keys() == result["plain"].keys()
    for name, values in result["plain"].items():
        assert result["stacked"][name] == pytest.approx(values, rel=1e-5), name
    assert result["errors"] == [
        "The model 'functional_2' is compiled with steps_per_execution=4: stacked steps replace it, compile with 1",
        "The batches are not stacked: give ShuffledBatches a stack_steps",
    ]


def test_stacked_steps_need_the_jax_backend():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="need KERAS_BACKEND=jax, not 'tensorflow'"):
        scan_stacked_steps(model, ShuffledBatches(*small_data(), BATCH, stack_steps=2))
