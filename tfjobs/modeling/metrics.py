"""Custom streaming metrics, written with ``keras.ops`` so that they run on every backend.

A streaming metric keeps running sums in variables across batches and reports
their ratio; Keras (and :mod:`tfjobs.modeling.custom_loop`) reset it at each epoch and
before each validation pass.
"""

from __future__ import annotations

import keras
from keras import ops

from tfjobs.modeling.losses import huber_per_example


@keras.saving.register_keras_serializable(package="shardline")
class HuberMetric(keras.metrics.Metric):
    """The (sample-weighted) mean Huber loss of every example seen since the last reset.

    Unlike a per-batch loss averaged over batches, it weighs every example once,
    whatever the batch sizes, and honours ``sample_weight``.
    """

    def __init__(self, delta: float = 1.0, name: str = "huber", **kwargs):
        super().__init__(name=name, **kwargs)
        if not delta > 0:
            raise ValueError(f"HuberMetric needs a positive delta (the threshold), got {delta!r}")
        self.delta = float(delta)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype=self.dtype, name="total")
        self.weight_sum = self.add_variable(shape=(), initializer="zeros", dtype=self.dtype, name="weight_sum")

    def update_state(self, y_true, y_pred, sample_weight=None):
        values = ops.cast(huber_per_example(y_true, y_pred, self.delta), self.dtype)
        if sample_weight is None:
            weights = ops.ones_like(values)
        else:
            weights = ops.cast(sample_weight, self.dtype)
            if len(weights.shape) > len(values.shape):  # [batch, 1] weights for [batch] values
                weights = ops.squeeze(weights, axis=-1)
            weights = ops.broadcast_to(weights, ops.shape(values))
        self.total.assign_add(ops.sum(values * weights))
        self.weight_sum.assign_add(ops.sum(weights))

    def result(self):
        return ops.divide_no_nan(self.total, self.weight_sum)

    def reset_state(self):
        self.total.assign(0.0)
        self.weight_sum.assign(0.0)

    def get_config(self):
        config = {"delta": self.delta}
        base_config = super().get_config()
        return {**base_config, **config}
