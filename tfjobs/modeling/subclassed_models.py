"""Subclassed training models: ``keras.Model`` subclasses with ``build()``, ``call()`` and ``get_config()``.

Each takes the encoded features (``{NUMBERS: [batch, k], <index>: [batch], <vector>: [batch, n]}``,
what :class:`tfjobs.features.preprocessing.FeaturePreprocessor` outputs) and returns one
value per example for regression, class probabilities for classification
(``output_units > 1``). They are written with ``keras.layers`` and ``keras.ops`` only,
so they train on any Keras backend and export like functional models.

- :class:`ResidualModel`: one :class:`tfjobs.modeling.layers.ResidualBlock` applied
  ``repeats`` times: depth without more weights.
- :class:`WideAndDeepModel`: a linear model over one-hot features ("wide",
  memorizes) plus an MLP over embeddings ("deep", generalizes), added up. It
  names its two groups of variables, so :mod:`tfjobs.modeling.custom_loop` can train
  the wide part with SGD and the deep part with Adam.
- :class:`ReconstructingModel`: the label head shares a code with a decoder
  that reconstructs the clean numeric features from noised inputs; the
  reconstruction error is added to the loss with ``add_loss`` and reported as
  the ``reconstruction_loss`` metric.

``tfjobs.modeling.models`` registers a builder for each under a model kind.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tfjobs.features import NUMBERS
from tfjobs.modeling.layers import (
    ColumnNormCap,
    DenseLayer,
    FanInNormal,
    FeatureVector,
    GroupLasso,
    ResidualBlock,
    TrainingNoise,
)

serializable = keras.saving.register_keras_serializable(package="shardline")


def _head(output_units: int, name: str = "head") -> DenseLayer:
    """Class probabilities for ``output_units > 1``, one linear unit otherwise."""
    return DenseLayer(output_units, activation="softmax" if output_units > 1 else None, name=name)


class EncodedFeatureModel(keras.Model):
    """What the subclassed models share: the encoded-feature arguments and their config."""

    def __init__(
        self,
        numeric_width: int,
        index_sizes: dict[str, int],
        encodings: dict[str, str] | None = None,
        embedding_dims: dict[str, int] | None = None,
        vector_widths: dict[str, int] | None = None,
        parts: dict[str, dict] | None = None,
        output_units: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.numeric_width = int(numeric_width)
        self.index_sizes = dict(index_sizes)
        self.encodings = dict(encodings or {})
        self.embedding_dims = dict(embedding_dims or {})
        self.vector_widths = dict(vector_widths or {})
        self.parts = dict(parts or {})
        self.output_units = int(output_units)

    def feature_vector(self, encodings: dict[str, str] | None = None, name: str = "features") -> FeatureVector:
        return FeatureVector(
            self.numeric_width,
            self.index_sizes,
            self.encodings if encodings is None else encodings,
            self.embedding_dims,
            self.vector_widths,
            self.parts,
            name=name,
        )

    def get_config(self):
        config = {
            "numeric_width": self.numeric_width,
            "index_sizes": self.index_sizes,
            "encodings": self.encodings,
            "embedding_dims": self.embedding_dims,
            "vector_widths": self.vector_widths,
            "parts": self.parts,
            "output_units": self.output_units,
        }
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class ResidualModel(EncodedFeatureModel):
    """Features -> noise (training only) -> projection to ``units`` -> one residual block ``repeats`` times -> head."""

    def __init__(self, *, units: int = 64, repeats: int = 3, noise_stddev: float = 0.0, dropout: float = 0.0,
                 **kwargs):
        super().__init__(**kwargs)
        if int(repeats) < 1:
            raise ValueError(f"ResidualModel needs repeats >= 1, got {repeats!r}")
        self.units, self.repeats = int(units), int(repeats)
        self.noise_stddev, self.dropout = float(noise_stddev), float(dropout)
        self.features = self.feature_vector()
        self.noise = TrainingNoise(self.noise_stddev, name="noise")
        self.project = DenseLayer(self.units, activation="relu", name="project")
        self.block = ResidualBlock(self.units, dropout=self.dropout, name="shared_block")
        self.head = _head(self.output_units)

    def build(self, input_shape):
        self.features.build(input_shape)
        self.project.build((None, self.features.width))
        self.block.build((None, self.units))
        self.head.build((None, self.units))

    def call(self, inputs, training=False):
        x = self.noise(self.features(inputs), training=training)
        x = self.project(x)
        for _ in range(self.repeats):  # the same weights each time
            x = self.block(x, training=training)
        return self.head(x)

    def get_config(self):
        config = {"units": self.units, "repeats": self.repeats, "noise_stddev": self.noise_stddev,
                  "dropout": self.dropout}
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class WideAndDeepModel(EncodedFeatureModel):
    """``wide(one-hot features) + deep(features with embeddings)``, then the head's activation.

    The wide part is one linear layer with a :class:`GroupLasso` penalty; the deep
    part is ReLU :class:`DenseLayer` s whose kernels are capped by
    :class:`ColumnNormCap`. :attr:`wide_trainable_variables` and
    :attr:`deep_trainable_variables` split the weights for two optimizers.
    """

    def __init__(self, *, hidden_units=(64, 32), wide_penalty: float = 1e-4, max_norm: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.wide_penalty, self.max_norm = float(wide_penalty), float(max_norm)
        self.wide_features = self.feature_vector({name: "one_hot" for name in self.index_sizes}, "wide_features")
        self.wide = DenseLayer(self.output_units, kernel_regularizer=GroupLasso(self.wide_penalty), name="wide")
        self.deep_features = self.feature_vector(name="deep_features")
        self.deep = [
            DenseLayer(units, activation="relu", kernel_initializer=FanInNormal(math.sqrt(2.0)),
                       kernel_constraint=ColumnNormCap(self.max_norm), name=f"deep_{i}")
            for i, units in enumerate(self.hidden_units)
        ]
        self.deep_output = DenseLayer(self.output_units, name="deep_output")

    def build(self, input_shape):
        self.wide_features.build(input_shape)
        self.wide.build((None, self.wide_features.width))
        self.deep_features.build(input_shape)
        width = self.deep_features.width
        for layer in self.deep:
            layer.build((None, width))
            width = layer.units
        self.deep_output.build((None, width))

    @property
    def wide_trainable_variables(self) -> list:
        return self.wide_features.trainable_variables + self.wide.trainable_variables

    @property
    def deep_trainable_variables(self) -> list:
        wide = {v.path for v in self.wide_trainable_variables}
        return [v for v in self.trainable_variables if v.path not in wide]

    def call(self, inputs, training=False):
        wide = self.wide(self.wide_features(inputs))
        x = self.deep_features(inputs)
        for layer in self.deep:
            x = layer(x)
        logits = wide + self.deep_output(x)
        return ops.softmax(logits) if self.output_units > 1 else logits

    def get_config(self):
        config = {"hidden_units": list(self.hidden_units), "wide_penalty": self.wide_penalty,
                  "max_norm": self.max_norm}
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class ReconstructingModel(EncodedFeatureModel):
    """A shared code predicts the label and reconstructs the clean numeric features from noised inputs.

    ``call()`` adds ``reconstruction_weight * mean squared reconstruction error`` with
    ``add_loss``, so ``fit()`` and the custom loop minimize it with the label's loss.
    ``compute_loss()`` (which both call after ``call()``) reports the unweighted
    error as the ``reconstruction_loss`` metric. Keras recommends updating metrics
    there rather than in ``call()``: under the JAX backend a metric updated in
    ``call()`` fails.
    """

    def __init__(self, *, hidden_units=(64, 32), noise_stddev: float = 0.1, reconstruction_weight: float = 0.1,
                 **kwargs):
        super().__init__(**kwargs)
        if not self.numeric_width:
            raise ValueError("ReconstructingModel reconstructs the features encoded as numbers, and this spec has none")
        if not reconstruction_weight > 0:
            raise ValueError(f"ReconstructingModel needs reconstruction_weight > 0, got {reconstruction_weight!r}")
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.noise_stddev, self.reconstruction_weight = float(noise_stddev), float(reconstruction_weight)
        self.features = self.feature_vector()
        self.noise = TrainingNoise(self.noise_stddev, name="noise")
        self.encoder = [DenseLayer(units, activation="relu", name=f"encode_{i}")
                        for i, units in enumerate(self.hidden_units)]
        self.decoder = DenseLayer(self.numeric_width, name="decode_numeric")
        self.head = _head(self.output_units)
        self.reconstruction_tracker = keras.metrics.Mean(name="reconstruction_loss")

    def build(self, input_shape):
        self.features.build(input_shape)
        width = self.features.width
        for layer in self.encoder:
            layer.build((None, width))
            width = layer.units
        self.decoder.build((None, width))
        self.head.build((None, width))

    def call(self, inputs, training=False):
        x = self.noise(self.features(inputs), training=training)
        for layer in self.encoder:
            x = layer(x)
        reconstruction = self.decoder(x)
        error = ops.mean(ops.square(reconstruction - ops.cast(inputs[NUMBERS], reconstruction.dtype)))
        self.add_loss(self.reconstruction_weight * error)
        return self.head(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # The model's own losses are what call() added: its layers have no weight penalties.
        added = self.losses
        if added:
            self.reconstruction_tracker.update_state(ops.sum(ops.stack(added)) / self.reconstruction_weight)
        return super().compute_loss(x, y, y_pred, sample_weight, training)

    def get_config(self):
        config = {"hidden_units": list(self.hidden_units), "noise_stddev": self.noise_stddev,
                  "reconstruction_weight": self.reconstruction_weight}
        base_config = super().get_config()
        return {**base_config, **config}
