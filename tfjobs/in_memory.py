"""Training batches held in memory, reshuffled every epoch, for ``model.fit()`` on any Keras backend.

``fit()`` on plain arrays gathers and copies every batch on its own. Under
``KERAS_BACKEND=jax`` on a GPU that costs a few device dispatches per batch (a
gather or a host-to-device copy per input), which for a small model is far more
than the training step itself: measured on an H200, ``fit()`` on arrays trained
Shardline's housing MLP at a fifth to a quarter of a hand-written JAX step's speed,
and at 2 to 4 times that speed on these batches (``benchmarks/gpu_training.py``).

:class:`ShuffledBatches` holds the arrays where the backend computes (on the
accelerator under JAX) and, at the start of each epoch, permutes the rows and
stacks them into batches in one compiled call. A step then costs ``fit()`` its own loop
and nothing more. Every epoch sees every row once, in a new order; a short last batch
is kept. Other backends get the same batches cut with NumPy.

This module imports no TensorFlow.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


class ShuffledBatches(keras.utils.PyDataset):
    """``(x, y)`` batches of in-memory arrays, the rows reshuffled at the start of every epoch.

    Args:
        x: an array, or a dict or list of arrays, with the same number of rows.
        y: the targets' array, with as many rows as ``x``.
        batch_size: rows per batch; the last batch holds what is left.
        seed: the shuffle's seed; the same seed gives the same order of epochs.
        shuffle: ``False`` keeps the rows in order.
    """

    def __init__(self, x: Any, y: Any, batch_size: int, seed: int = 0, shuffle: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        leaves = keras.tree.flatten((x, y))
        rows = {int(np.shape(leaf)[0]) for leaf in leaves}
        if len(rows) != 1:
            raise ValueError(f"x and y must have the same number of rows, got row counts {sorted(rows)}")
        self.rows = rows.pop()
        if self.rows == 0:
            raise ValueError("ShuffledBatches needs at least one row")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._epoch = 0
        self._seed = seed
        self._cuts = tuple(range(batch_size, self.rows, batch_size))
        self._structure = keras.tree.map_structure(lambda _: 0, (x, y))  # the shape of a batch, no data
        self._backend = keras.backend.backend()
        if self._backend == "jax":
            import jax

            self._leaves = jax.device_put(leaves)
            self._permute_on_device = jax.jit(self._permute)
        else:
            self._leaves = [np.asarray(leaf) for leaf in leaves]
        self._batches: list | None = None

    @property
    def num_batches(self) -> int:
        return len(self._cuts) + 1

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int):
        if self._batches is None:  # the epoch's first batch asked for: cut them all
            self._batches = self._cut(self._epoch)
        return self._batches[index]

    def on_epoch_end(self) -> None:
        self._epoch += 1
        self._batches = None

    def _cut(self, epoch: int) -> list:
        """Every batch of this epoch, each ``(x, y)`` in the structure the arrays came in."""
        # The order comes from NumPy on every backend: the same seed gives the same batches under
        # JAX and TensorFlow, and jax.random.permutation is a sort, slower than NumPy's on a CPU.
        order = np.random.default_rng([self._seed, epoch]).permutation(self.rows) if self.shuffle else None
        if self._backend == "jax":
            # Unstacking a (batches, batch_size, ...) array on the device is one compiled slice per
            # hundred batches; cutting each batch by indexing would be a dispatch per batch and array.
            whole, tails = self._permute_on_device(self._leaves, order)
            pieces = [list(batches) + ([tail] if tail.shape[0] else []) for batches, tail in zip(whole, tails)]
        else:
            leaves = self._leaves if order is None else [np.take(leaf, order, axis=0) for leaf in self._leaves]
            pieces = [np.split(leaf, self._cuts) for leaf in leaves]
        return [keras.tree.pack_sequence_as(self._structure, [leaf[i] for leaf in pieces])
                for i in range(self.num_batches)]

    def _permute(self, leaves: list, order) -> tuple[list, list]:
        """Traced by ``jax.jit``: each array in ``order``, as its whole batches stacked, and the short tail."""
        import jax.numpy as jnp

        if order is not None:
            leaves = [jnp.take(leaf, order, axis=0) for leaf in leaves]
        whole = self.rows // self.batch_size
        end = whole * self.batch_size
        return ([leaf[:end].reshape(whole, self.batch_size, *leaf.shape[1:]) for leaf in leaves],
                [leaf[end:] for leaf in leaves])
