"""Custom Keras layers and weight hooks for training models, backend-agnostic (``keras.ops``).

What a training model is made of when stock layers are not enough:

- :class:`FeatureVector`: the encoded features (what
  :class:`tfjobs.features.preprocessing.FeaturePreprocessor` outputs) as one float vector:
  the stacked numbers, the vectors (multi-hot, counts), then each index one-hot or
  through a trainable ``Embedding``;
- :class:`DenseLayer`: a dense layer that creates its weights in ``build()`` with
  a custom initializer, regularizer and constraint;
- :class:`TrainingNoise`: Gaussian noise added only when ``training=True``;
- :class:`ResidualBlock`: ``x + f(x)`` at constant width, so one block can be
  applied several times;
- :class:`TokenSequenceEncoder`: token ids (0 for padding) -> one vector, through an
  ``Embedding`` and a masked mean (and max), or a ``Conv1D`` and a masked max (the model
  part of a text feature's ``int`` output, :mod:`tfjobs.modeling.parts`);
- weight hooks: :class:`FanInNormal` (initializer), :class:`GroupLasso`
  (regularizer) and :class:`ColumnNormCap` (constraint).

Every class is registered with ``register_keras_serializable(package="shardline")``
and keeps its arguments in ``get_config``: a ``.keras`` file that uses them reloads
without ``custom_objects`` once this module is imported (Keras does not import
modules outside ``keras`` by itself; importing :mod:`tfjobs.modeling.models` imports this one).
"""

from __future__ import annotations

import math
import random

import keras
from keras import layers, ops

from tfjobs.features import NUMBERS  # the key of the stacked numbers in the encoded inputs

serializable = keras.saving.register_keras_serializable(package="shardline")


@serializable
class FanInNormal(keras.initializers.Initializer):
    """Normal weights with standard deviation ``scale / sqrt(fan_in)``.

    ``scale=sqrt(2)`` keeps the variance of ReLU activations constant from layer to
    layer (He et al. 2015); ``scale=1`` suits linear layers.
    """

    def __init__(self, scale: float = 1.0, seed: int | None = None):
        if not scale > 0:
            raise ValueError(f"FanInNormal needs a positive scale, got {scale!r}")
        self.scale = float(scale)
        self.seed = seed
        # Unseeded: a seed of its own from Python's generator (seeded by keras.utils.set_random_seed),
        # as Keras' own initializers do. Like theirs, one instance reused by several layers repeats itself.
        self._seed = seed if seed is not None else random.randint(1, 10**9)

    def __call__(self, shape, dtype=None):
        fan_in = math.prod(shape[:-1]) if len(shape) > 1 else shape[0]
        stddev = self.scale / math.sqrt(max(fan_in, 1))
        return keras.random.normal(shape, stddev=stddev, dtype=dtype, seed=self._seed)

    def get_config(self):
        return {"scale": self.scale, "seed": self.seed}


@serializable
class GroupLasso(keras.regularizers.Regularizer):
    """``factor * sum_i ||W[i, :]||_2``: a penalty on each input's whole row of weights.

    Unlike L2 it pushes the weights of a useless input feature to exactly zero
    together (feature selection), which suits the linear "wide" part of a wide &
    deep model.
    """

    def __init__(self, factor: float = 1e-3):
        if factor < 0:
            raise ValueError(f"GroupLasso needs a factor >= 0, got {factor!r}")
        self.factor = float(factor)

    def __call__(self, weights):
        if len(weights.shape) < 2:
            weights = ops.expand_dims(weights, -1)
        # The epsilon keeps the gradient finite when a row is exactly zero.
        row_norms = ops.sqrt(ops.sum(ops.square(weights), axis=-1) + 1e-12)
        return self.factor * ops.sum(row_norms)

    def get_config(self):
        return {"factor": self.factor}


@serializable
class ColumnNormCap(keras.constraints.Constraint):
    """Rescale each unit's incoming weights (a kernel column) to an L2 norm of at most ``max_norm``.

    Optimizers apply a variable's constraint right after each update, in ``fit()``
    and in :mod:`tfjobs.modeling.custom_loop` alike.
    """

    def __init__(self, max_norm: float = 3.0):
        if not max_norm > 0:
            raise ValueError(f"ColumnNormCap needs a positive max_norm, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def __call__(self, weights):
        norms = ops.sqrt(ops.sum(ops.square(weights), axis=0, keepdims=True))
        # Columns within the cap are left exactly as they are (keras.constraints.MaxNorm
        # scales every column by norm / (norm + epsilon), a drift at each update).
        scale = ops.where(norms > self.max_norm, self.max_norm / ops.maximum(norms, self.max_norm), 1.0)
        return weights * ops.cast(scale, weights.dtype)

    def get_config(self):
        return {"max_norm": self.max_norm}


@serializable
class DenseLayer(layers.Layer):
    """``activation(inputs @ kernel + bias)`` whose kernel takes an initializer, a regularizer and a constraint.

    The weights are created in ``build()``, once the input width is known; the
    initializer defaults to :class:`FanInNormal` (scaled for the activation).
    """

    def __init__(
        self,
        units: int,
        activation=None,
        use_bias: bool = True,
        kernel_initializer=None,
        kernel_regularizer=None,
        kernel_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"DenseLayer needs at least one unit, got {units!r}")
        self.units = int(units)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        if kernel_initializer is None:
            kernel_initializer = FanInNormal(scale=math.sqrt(2.0) if activation == "relu" else 1.0)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros") if self.use_bias else None

    def call(self, inputs):
        outputs = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            outputs = outputs + self.bias
        return self.activation(outputs)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        config = {
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
            "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
        }
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class TrainingNoise(layers.Layer):
    """Adds Gaussian noise with standard deviation ``stddev`` when ``training=True``; the identity otherwise.

    Inference (evaluation, export, serving) never sees noise, so predictions are
    deterministic and the serving skew check compares like with like.
    """

    def __init__(self, stddev: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if stddev < 0:
            raise ValueError(f"TrainingNoise needs stddev >= 0, got {stddev!r}")
        self.stddev = float(stddev)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def call(self, inputs, training=False):
        if training and self.stddev > 0:
            noise = keras.random.normal(ops.shape(inputs), stddev=self.stddev, dtype=inputs.dtype,
                                        seed=self.seed_generator)
            return inputs + noise
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {"stddev": self.stddev, "seed": self.seed}
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class ResidualBlock(layers.Layer):
    """``LayerNorm(x + W2 relu(W1 x))`` at the width ``units`` of its input.

    The output has the width of the input, so a model can apply the same block (the
    same weights) several times.
    """

    def __init__(self, units: int, hidden_units: int | None = None, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        self.hidden_units = int(hidden_units or 2 * units)
        self.dropout = float(dropout)
        self.expand = DenseLayer(self.hidden_units, activation="relu", name="expand")
        # A small initial residual branch: the block starts close to the identity.
        self.project = DenseLayer(self.units, kernel_initializer=FanInNormal(scale=0.1), name="project")
        self.drop = layers.Dropout(self.dropout, name="dropout")
        self.norm = layers.LayerNormalization(name="norm")

    def build(self, input_shape):
        if input_shape[-1] != self.units:
            raise ValueError(
                f"ResidualBlock '{self.name}' has width {self.units} but its input has width {input_shape[-1]}: "
                "project the input to the block's width first"
            )
        self.expand.build(input_shape)
        self.project.build((*input_shape[:-1], self.hidden_units))
        self.norm.build(input_shape)

    def call(self, inputs, training=False):
        residual = self.project(self.drop(self.expand(inputs), training=training))
        return self.norm(inputs + residual)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {"units": self.units, "hidden_units": self.hidden_units, "dropout": self.dropout}
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class TokenSequenceEncoder(layers.Layer):
    """Token ids ``[batch, length]`` (0 is padding) -> one vector per row, from a trainable ``Embedding``.

    ``encoder``: ``"mean"``, the mean of the tokens' embeddings (``embedding_dim`` wide);
    ``"mean_max"``, that mean and the elementwise max beside it (twice as wide: a word that
    says spam counts however long the message around it); ``"conv"``, a ``Conv1D`` of width 3
    over the embeddings (ReLU) and its max over the tokens. Padding is masked here, explicitly,
    so that no Keras mask leaves the layer and every model kind takes its vector as any other;
    a row without a token (an empty message) gives zeros.
    """

    ENCODERS = ("mean", "mean_max", "conv")

    def __init__(self, vocabulary_size: int, embedding_dim: int, encoder: str = "mean_max", **kwargs):
        super().__init__(**kwargs)
        if encoder not in self.ENCODERS:
            raise ValueError(f"TokenSequenceEncoder's encoder must be one of {self.ENCODERS}, got {encoder!r}")
        self.vocabulary_size = int(vocabulary_size)
        self.embedding_dim = int(embedding_dim)
        self.encoder = encoder
        self.embedding = layers.Embedding(self.vocabulary_size, self.embedding_dim, name="embedding")
        self.conv = (layers.Conv1D(self.embedding_dim, 3, padding="same", activation="relu", name="conv")
                     if encoder == "conv" else None)

    def build(self, input_shape):
        self.embedding.build(input_shape)
        if self.conv is not None:
            self.conv.build((*input_shape, self.embedding_dim))

    def call(self, token_ids):
        present = ops.not_equal(token_ids, 0)[..., None]  # [batch, length, 1]
        weights = ops.cast(present, self.compute_dtype)
        tokens = ops.sum(weights, axis=1)  # [batch, 1]
        vectors = self.embedding(token_ids)
        if self.conv is not None:
            vectors = self.conv(vectors * weights)
        mean = ops.sum(vectors * weights, axis=1) / ops.maximum(tokens, 1.0)
        if self.encoder == "mean":
            return mean
        # where, not a product with the mask: -inf * 0 would be NaN for a row without tokens.
        top = ops.max(ops.where(present, vectors, float("-inf")), axis=1)
        top = ops.where(tokens > 0, top, ops.zeros_like(top))
        return top if self.encoder == "conv" else ops.concatenate([mean, top], axis=-1)

    @property
    def width(self) -> int:
        return self.embedding_dim * (2 if self.encoder == "mean_max" else 1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.width)

    def get_config(self):
        config = {"vocabulary_size": self.vocabulary_size, "embedding_dim": self.embedding_dim,
                  "encoder": self.encoder}
        base_config = super().get_config()
        return {**base_config, **config}


@serializable
class FeatureVector(layers.Layer):
    """Encoded features -> ``[batch, width]`` floats: the numbers, the vectors, then each index.

    ``index_sizes`` are the sizes of the index inputs (an out-of-vocabulary index
    included); an index whose ``encodings`` entry is ``"embedding"`` goes through a
    trainable ``Embedding`` of ``embedding_dims[name]`` columns, any other is one-hot.
    ``vector_widths`` are the widths of the vector inputs (multi-hot or count), taken as
    they come. ``parts`` describe inputs of other forms (a token sequence, an image), each
    made a vector by the part registered for its form (:mod:`tfjobs.modeling.parts`).
    """

    def __init__(
        self,
        numeric_width: int,
        index_sizes: dict[str, int],
        encodings: dict[str, str] | None = None,
        embedding_dims: dict[str, int] | None = None,
        vector_widths: dict[str, int] | None = None,
        parts: dict[str, dict] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        from tfjobs.modeling.parts import build_part

        self.numeric_width = int(numeric_width)
        self.index_sizes = {name: int(size) for name, size in index_sizes.items()}
        self.encodings = {name: (encodings or {}).get(name, "one_hot") for name in self.index_sizes}
        self.embedding_dims = {name: int(dim) for name, dim in (embedding_dims or {}).items()}
        self.vector_widths = {name: int(width) for name, width in (vector_widths or {}).items()}
        self.parts = {name: dict(config) for name, config in (parts or {}).items()}
        if not self.numeric_width and not self.index_sizes and not self.vector_widths and not self.parts:
            raise ValueError("FeatureVector needs numbers, indices, vectors or parts, got none")
        self.part_layers = {name: build_part(name, config) for name, config in self.parts.items()}
        self.embeddings = {
            name: layers.Embedding(size, self.embedding_dims.get(name, 8), name=f"embed_{name}")
            for name, size in self.index_sizes.items()
            if self.encodings[name] == "embedding"
        }

    @property
    def width(self) -> int:
        from tfjobs.modeling.parts import part_width

        return self.numeric_width + sum(self.vector_widths.values()) + sum(
            self.embeddings[name].output_dim if name in self.embeddings else size
            for name, size in self.index_sizes.items()
        ) + sum(part_width(self.part_layers[name], config) for name, config in self.parts.items())

    def build(self, input_shape=None):
        for embedding in self.embeddings.values():
            embedding.build((None,))
        for name, part in self.part_layers.items():
            part.build((None, *self.parts[name]["shape"]))

    def call(self, inputs):
        parts = [ops.cast(inputs[NUMBERS], self.compute_dtype)] if self.numeric_width else []
        parts += [ops.cast(inputs[name], self.compute_dtype) for name in self.vector_widths]
        for name, size in self.index_sizes.items():
            indices = inputs[name]
            if name in self.embeddings:
                parts.append(self.embeddings[name](indices))
            else:
                parts.append(ops.one_hot(ops.cast(indices, "int32"), size, dtype=self.compute_dtype))
        parts += [ops.cast(self.part_layers[name](inputs[name]), self.compute_dtype) for name in self.parts]
        return parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)

    def compute_output_shape(self, input_shape):
        batch = next(iter(input_shape.values()))[0]
        return (batch, self.width)

    def get_config(self):
        config = {
            "numeric_width": self.numeric_width,
            "index_sizes": self.index_sizes,
            "encodings": self.encodings,
            "embedding_dims": self.embedding_dims,
            "vector_widths": self.vector_widths,
            "parts": self.parts,
        }
        base_config = super().get_config()
        return {**base_config, **config}
