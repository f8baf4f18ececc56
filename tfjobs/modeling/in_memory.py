"""Training batches held in memory, reshuffled every epoch, for ``model.fit()`` on any Keras backend.

``fit()`` on plain arrays gathers and copies every batch on its own. Under
``KERAS_BACKEND=jax`` on a GPU that costs a few device dispatches per batch (a
gather or a host-to-device copy per input), which for a small model is far more
than the training step itself: measured on an H200, ``fit()`` on arrays trained
Shardline's housing MLP at a fifth to a quarter of a hand-written JAX step's speed,
and at 2 to 4 times that speed on these batches (``benchmarks/gpu_training.py``).

:class:`ShuffledBatches` holds the arrays where the backend computes (on the
accelerator under JAX) and, at the start of each epoch, permutes the rows and
stacks them into batches in one compiled call (the order drawn on the accelerator too).
A step then costs ``fit()`` its own loop and nothing more. Every epoch sees every row
once, in a new order; a short last batch is kept. Other backends get batches cut with
NumPy, the same as JAX's on a CPU for one seed.

That loop is the rest of the cost: Keras 3.15's JAX ``fit()`` runs even
``steps_per_execution`` steps as a Python loop, one compiled call (and a ``device_put``
per input) per step. With ``stack_steps=k``, each item of :class:`ShuffledBatches` is
``k`` batches stacked on a new first axis, and :func:`scan_stacked_steps` makes ``fit()``
run each stack in one compiled ``lax.scan``: one dispatch per ``k`` steps, the same
updates in the same order. (Keras has merged the same idea into its own trainer, keras-team/keras#23527, not
yet in a release; this goes when it ships.)

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
        stack_steps: if set, each item stacks this many consecutive batches on a new first
            axis, for :func:`scan_stacked_steps`; the whole batches left over make one
            smaller stack, and a short last batch a stack of its own.
        shuffle_on_device: draw each epoch's order with ``jax.random`` on the device
            (JAX backend) rather than with NumPy on the host. NumPy's order is the same
            under every backend for one seed; on a GPU it is slow: on an H200's host,
            permuting 4M rows took NumPy 0.19 s, most of an epoch's training, and
            ``jax.random`` 1 ms on the GPU (on a CPU, ``jax.random``'s sort is the slower
            one). ``None``: on the device when JAX's default device is not a CPU.
    """

    def __init__(self, x: Any, y: Any, batch_size: int, seed: int = 0, shuffle: bool = True,
                 stack_steps: int | None = None, shuffle_on_device: bool | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if stack_steps is not None and stack_steps < 1:
            raise ValueError(f"stack_steps must be at least 1, got {stack_steps}")
        leaves = keras.tree.flatten((x, y))
        rows = {int(np.shape(leaf)[0]) for leaf in leaves}
        if len(rows) != 1:
            raise ValueError(f"x and y must have the same number of rows, got row counts {sorted(rows)}")
        self.rows = rows.pop()
        if self.rows == 0:
            raise ValueError("ShuffledBatches needs at least one row")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.stack_steps = stack_steps
        self._epoch = 0
        self._seed = seed
        self._whole_batches, self._tail_rows = divmod(self.rows, batch_size)
        self._structure = keras.tree.map_structure(lambda _: 0, (x, y))  # the shape of a batch, no data
        self._backend = keras.backend.backend()
        if self._backend == "jax":
            import jax

            self._leaves = jax.device_put(leaves)
            self._permute_on_device = jax.jit(self._permute)
            if shuffle_on_device is None:
                shuffle_on_device = jax.default_backend() != "cpu"
            self._device_order = jax.jit(
                lambda epoch: jax.random.permutation(jax.random.fold_in(jax.random.key(seed), epoch), self.rows)
            )
        else:
            if shuffle_on_device:
                raise ValueError(f"shuffle_on_device needs KERAS_BACKEND=jax, not {self._backend!r}")
            self._leaves = [np.asarray(leaf) for leaf in leaves]
        self.shuffle_on_device = bool(shuffle_on_device)
        self._batches: list | None = None

    @property
    def num_batches(self) -> int:
        """Items per epoch: batches, or stacks of batches with ``stack_steps``."""
        per_item = self.stack_steps or 1
        return -(-self._whole_batches // per_item) + (1 if self._tail_rows else 0)

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
        """Every item of this epoch, each ``(x, y)`` in the structure the arrays came in."""
        if not self.shuffle:
            order = None
        elif self.shuffle_on_device:
            order = self._device_order(epoch)
        else:
            order = np.random.default_rng([self._seed, epoch]).permutation(self.rows)
        if self._backend == "jax":
            # Unstacking an (items, ...) array on the device is one compiled slice per hundred items;
            # cutting each batch by indexing would be a dispatch per batch and array.
            stacked, rests = self._permute_on_device(self._leaves, order)
        else:
            stacked, rests = self._permute(self._leaves, order, np)
        pieces = [list(items) + rest for items, rest in zip(stacked, rests)]
        return [keras.tree.pack_sequence_as(self._structure, [leaf[i] for leaf in pieces])
                for i in range(self.num_batches)]

    def _permute(self, leaves: list, order, xp=None) -> tuple[list, list]:
        """Each array in ``order``, cut into items: the full items stacked on a first axis, and the
        items left (a smaller stack of whole batches, then the short batch), possibly empty.

        ``xp`` is NumPy, or ``jax.numpy`` when ``jax.jit`` traces it.
        """
        if xp is None:
            import jax.numpy as xp
        if order is not None:
            leaves = [xp.take(leaf, order, axis=0) for leaf in leaves]
        batch, whole, per_item = self.batch_size, self._whole_batches, self.stack_steps or 1
        full = whole // per_item
        ends = (full * per_item * batch, whole * batch)  # of the full items, of the whole batches

        def cut(leaf) -> tuple:
            stacked = leaf[:ends[0]].reshape(full, *(() if self.stack_steps is None else (per_item,)), batch,
                                              *leaf.shape[1:])
            rest = []
            if ends[1] > ends[0]:  # whole batches left over: a smaller stack
                rest.append(leaf[ends[0]:ends[1]].reshape(-1, batch, *leaf.shape[1:]))
            if self._tail_rows:  # the short batch, alone (stacked alone)
                rest.append(leaf[ends[1]:] if self.stack_steps is None else leaf[ends[1]:][None])
            return stacked, rest

        cuts = [cut(leaf) for leaf in leaves]
        return [stacked for stacked, _ in cuts], [rest for _, rest in cuts]


def scan_stacked_steps(model: keras.Model, batches: ShuffledBatches) -> None:
    """Make ``model.fit(batches)`` run each stack of ``batches`` in one compiled ``lax.scan`` (JAX backend).

    Each step of the scan is the model's own ``train_step`` on one batch (its loss,
    metrics and optimizer update, in the batches' order), so the weights come out as
    from ``fit()`` on the batches one by one; callbacks see one step per stack. Call it
    after ``compile()`` (which resets it) with ``steps_per_execution=1``: the stacks
    replace it. Validation data stays plain batches.
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(f"Stacked steps run under jax.lax.scan and need KERAS_BACKEND=jax, not {backend!r}")
    if not batches.stack_steps:
        raise ValueError("The batches are not stacked: give ShuffledBatches a stack_steps")
    if not getattr(model, "compiled", False):
        raise ValueError(f"Compile the model {model.name!r} before scan_stacked_steps()")
    if model.steps_per_execution != 1:
        raise ValueError(
            f"The model {model.name!r} is compiled with steps_per_execution={model.steps_per_execution}: "
            "stacked steps replace it, compile with 1"
        )
    import jax

    # fit() builds the model, its loss and metrics from its first item, which here is a stack:
    # build them from one plain batch of it instead, so fit() finds them built.
    model._symbolic_build(data_batch=keras.tree.map_structure(lambda stack: stack[0], batches[0]))
    train_step = model.train_step

    def train_stack(state, stack):
        def step(state, batch):
            logs, state = train_step(state, batch)
            return state, logs

        state, logs = jax.lax.scan(step, state, stack)
        return jax.tree.map(lambda values: values[-1], logs), state  # the metrics after the stack's last step

    if model.jit_compile and not model.run_eagerly:
        train_stack = jax.jit(train_stack, donate_argnums=0)
    model.train_function = lambda state, iterator: train_stack(state, next(iterator))
