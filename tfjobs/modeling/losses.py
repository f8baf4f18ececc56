"""Custom Keras losses, written with ``keras.ops`` so that they run on every backend.

:class:`HuberLoss` is squared for errors up to ``delta`` and linear beyond it, so a
few districts priced at the census cap ($500,001) do not dominate training the way
they do under mean squared error. It keeps ``delta`` in ``get_config`` (Keras 3.15's
own ``keras.losses.Huber.get_config`` drops it, so a reloaded model silently trains
with ``delta=1``).

``huber_per_example`` is shared with :class:`tfjobs.modeling.metrics.HuberMetric`, so the
loss and the metric cannot disagree.
"""

from __future__ import annotations

import keras
from keras import ops


def same_rank(y_true, y_pred):
    """``[batch]`` labels against ``[batch, 1]`` predictions: give both the higher rank."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(ops.convert_to_tensor(y_true), y_pred.dtype)
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    elif len(y_pred.shape) == len(y_true.shape) - 1:
        y_pred = ops.expand_dims(y_pred, -1)
    return y_true, y_pred


def huber_per_example(y_true, y_pred, delta: float):
    """``0.5 e^2`` for ``|e| <= delta``, ``delta (|e| - delta / 2)`` beyond; averaged over the last axis."""
    y_true, y_pred = same_rank(y_true, y_pred)
    abs_error = ops.abs(y_pred - y_true)
    quadratic = ops.minimum(abs_error, delta)
    linear = abs_error - quadratic
    return ops.mean(0.5 * ops.square(quadratic) + delta * linear, axis=-1)


@keras.saving.register_keras_serializable(package="shardline")
class HuberLoss(keras.losses.Loss):
    """Huber loss with a configurable threshold ``delta`` (in the units of the training label).

    With ``label.scaling: standardize`` the label is in standard deviations, so
    ``delta=1.0`` means errors beyond one standard deviation of the price count
    linearly.
    """

    def __init__(self, delta: float = 1.0, name: str = "huber_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if not delta > 0:
            raise ValueError(f"HuberLoss needs a positive delta (the threshold), got {delta!r}")
        self.delta = float(delta)

    def call(self, y_true, y_pred):
        return huber_per_example(y_true, y_pred, self.delta)

    def get_config(self):
        config = {"delta": self.delta}
        base_config = super().get_config()
        return {**base_config, **config}
