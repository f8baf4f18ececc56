"""tfjobs.in_memory.ShuffledBatches: every row once per epoch, a new order each epoch, the same
batches under TensorFlow and JAX for one seed, and fit() trains on it under both."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT

from tfjobs.in_memory import ShuffledBatches

ROWS, BATCH = 23, 5


def small_data():
    x = {"numbers": np.arange(ROWS * 2, dtype=np.float32).reshape(ROWS, 2), "ids": np.arange(ROWS, dtype=np.int32)}
    return x, np.arange(ROWS, dtype=np.float32) * 10


def epochs_of_ids(batches: ShuffledBatches, epochs: int) -> list[list[list[int]]]:
    """The ``ids`` of each batch, epoch by epoch, read the way fit() reads a PyDataset."""
    seen = []
    for _ in range(epochs):
        batches.on_epoch_begin()
        epoch = []
        for i in range(len(batches)):
            x, y = batches[i]
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


FIT_ON_BATCHES = """
import json, sys
import keras, numpy as np
from tfjobs.in_memory import ShuffledBatches
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
print(json.dumps({"backend": keras.backend.backend(), "order": order, "array_module": first_type,
                  "loss": history["loss"]}))
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
    # Under JAX the batches are cut on the device (jax arrays), elsewhere they are NumPy.
    assert result["array_module"].startswith("jax" if backend == "jax" else "numpy")
    assert result["loss"][-1] < 0.01 * result["loss"][0]
    assert keras.backend.backend() == "tensorflow"  # this process was not switched
