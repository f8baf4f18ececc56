"""A custom training loop next to ``fit()``: ``tf.GradientTape`` in a ``tf.function``-compiled step.

What ``fit()`` cannot do with one optimizer: a model that names groups of
variables (:class:`tfjobs.modeling.subclassed_models.WideAndDeepModel`'s wide and deep
parts) gets one optimizer per group, SGD for the wide part and the compiled
optimizer (Adam) for the rest. Everything else is kept the same as ``fit()`` on
purpose, so that the two loops are interchangeable in the pipeline:

- the objective is ``model.compute_loss``: the compiled loss plus ``model.losses``
  (the weight regularizers' penalties and what ``call()`` adds with ``add_loss``),
  the very function ``fit()`` minimizes;
- the metrics are the model's compiled streaming metrics, plus any it tracks
  itself (``reconstruction_loss``), reset at the start of each epoch and before
  each validation pass;
- Keras applies each variable's constraint right after the optimizer's update
  (``Optimizer.apply_gradients``), as in ``fit()``;
- validation runs each epoch, and the same Keras callbacks (early stopping with
  the best weights restored, ``ModelCheckpoint``, TensorBoard, the per-epoch
  progress line of :func:`tfjobs.train.epoch_progress`) see the same logs;
- the step is compiled with XLA when the compiled model's ``jit_compile`` says so
  (Keras' ``"auto"``: on GPUs, when the model supports it).

The result is a model like any other: it is saved, evaluated and exported exactly
as a ``fit()`` model is. The loop trains on one device; several GPUs need ``fit()``
(``MirroredStrategy``).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def optimizer_groups(model, wide_learning_rate: float) -> list[tuple[object, list]]:
    """``[(optimizer, variables), ...]``: SGD for a model's wide part if it has one, the compiled optimizer otherwise."""
    import keras

    if getattr(model, "optimizer", None) is None:
        raise ValueError("The custom loop trains a compiled model: call model.compile(optimizer, loss, metrics) first")
    wide = list(getattr(model, "wide_trainable_variables", []))
    if not wide:
        return [(model.optimizer, list(model.trainable_variables))]
    deep = list(model.deep_trainable_variables)
    if len(wide) + len(deep) != len(model.trainable_variables):
        raise ValueError(f"Model {model.name}: its wide and deep variables do not partition its trainable variables")
    return [(keras.optimizers.SGD(wide_learning_rate, name="wide_sgd"), wide), (model.optimizer, deep)]


class GradientTapeLoop:
    """The compiled train and test steps of one compiled, built model."""

    def __init__(self, model, groups: list[tuple[object, list]]):
        import keras
        import tensorflow as tf

        self.model = model
        self.groups = groups
        self.variables = [v for _, variables in groups for v in variables]
        for optimizer, variables in groups:
            if not optimizer.built:
                optimizer.build(variables)  # their slots exist before the step is traced
        self.loss_tracker = keras.metrics.Mean(name="loss")
        jit_compile = bool(model.jit_compile)
        self.train_step = tf.function(self._train_step, jit_compile=jit_compile, reduce_retracing=True)
        self.test_step = tf.function(self._test_step, jit_compile=jit_compile, reduce_retracing=True)

    def _train_step(self, x, y):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            # The compiled loss + sum(model.losses): regularization penalties and add_loss terms.
            loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        gradients = tape.gradient(loss, self.variables)
        start = 0
        for optimizer, variables in self.groups:
            # Keras applies each variable's constraint right after this update.
            optimizer.apply_gradients(zip(gradients[start : start + len(variables)], variables))
            start += len(variables)
        self._track(loss, y, y_pred, x)
        return loss

    def _test_step(self, x, y):
        y_pred = self.model(x, training=False)
        loss = self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
        self._track(loss, y, y_pred, x)
        return loss

    def _track(self, loss, y, y_pred, x) -> None:
        """The epoch's mean loss weighs each batch by its size, as ``fit()`` does; then the streaming metrics."""
        from keras import ops

        self.loss_tracker.update_state(loss, sample_weight=ops.cast(ops.shape(y)[0], "float32"))
        self.model.compute_metrics(x, y, y_pred, sample_weight=None)

    def reset_metrics(self) -> None:
        self.loss_tracker.reset_state()
        self.model.reset_metrics()

    def results(self) -> dict[str, float]:
        logs = {name: float(value) for name, value in self.model.get_metrics_result().items()}
        logs["loss"] = float(self.loss_tracker.result())  # the model's own loss tracker is fit()'s
        return logs

    def run_epoch(self, data, step) -> dict[str, float]:
        self.reset_metrics()
        for x, y in data:
            step(x, y)
        return self.results()


def fit_with_gradient_tape(
    model,
    train_data,
    *,
    validation_data,
    epochs: int,
    callbacks: list | None = None,
    wide_learning_rate: float = 0.01,
):
    """Train a compiled model like ``model.fit(train_data, validation_data=..., epochs=...)``; returns the History."""
    import keras
    import tensorflow as tf

    if not model.built:
        # A subclassed model creates its weights on its first call: one all-zeros example of the right dtypes.
        features_spec = train_data.element_spec[0]
        model(tf.nest.map_structure(lambda s: tf.zeros([1, *s.shape[1:]], s.dtype), features_spec))
    loop = GradientTapeLoop(model, optimizer_groups(model, wide_learning_rate))
    log.info(
        "Custom loop: %s (XLA %s)",
        ", ".join(f"{type(o).__name__} on {len(v)} variables" for o, v in loop.groups),
        "on" if model.jit_compile else "off",
    )
    history = keras.callbacks.History()
    callback_list = keras.callbacks.CallbackList(
        [*(callbacks or []), history], model=model, epochs=epochs, verbose=0, steps=None
    )
    model.stop_training = False
    logs = {}
    callback_list.on_train_begin()
    for epoch in range(epochs):
        callback_list.on_epoch_begin(epoch)
        logs = loop.run_epoch(train_data, loop.train_step)
        callback_list.on_test_begin()
        validation = loop.run_epoch(validation_data, loop.test_step)
        callback_list.on_test_end(validation)
        logs.update({f"val_{name}": value for name, value in validation.items()})
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end(logs)
    return history
