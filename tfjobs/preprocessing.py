"""Keras preprocessing built from the adapted state, shared by training and serving.

:class:`FeaturePreprocessor` turns raw features (a dict of strings, floats with NaN
for missing, integer ids) into what the training model eats:

- numeric features, stacked: NaN imputed with the training mean, then
  ``keras.layers.Normalization`` (so a missing value becomes 0 after normalizing);
- each categorical feature: ``keras.layers.StringLookup`` / ``IntegerLookup`` over
  the training vocabulary, index 0 for values never seen in training; the missing
  value (``""`` or ``-1``) is a token of its own.

The same layer object runs in the tf.data input pipeline during training and
inside the exported inference model, so training and serving cannot drift apart.
It keeps its whole state in ``get_config``, so ``.keras`` files reload without
``custom_objects``.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import layers

from tfjobs.modeling.models import NUMERIC


@keras.saving.register_keras_serializable(package="shardline")
class FeaturePreprocessor(layers.Layer):
    """Raw feature dict -> ``{"numeric": [batch, k] float32, <categorical>: [batch] int64}``."""

    def __init__(self, state: dict[str, Any], **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.state = state
        features = state["features"]
        self.numeric_names = [name for name, f in features.items() if f["kind"] == "numeric"]
        self.categorical_names = [name for name, f in features.items() if f["kind"] != "numeric"]
        if self.numeric_names:
            means = [features[n]["mean"] for n in self.numeric_names]
            self._means = tf.constant(means, tf.float32)
            self.normalization = layers.Normalization(
                mean=means, variance=[features[n]["variance"] for n in self.numeric_names], name="normalize_numeric"
            )
            # Build now, eagerly: built lazily inside a tf.data map, its constants would belong to that graph.
            self.normalization.build((None, len(means)))
        self.lookups = {}
        for name in self.categorical_names:
            feature = features[name]
            lookup = layers.StringLookup if feature["kind"] == "categorical" else layers.IntegerLookup
            self.lookups[name] = lookup(vocabulary=feature["vocabulary"], num_oov_indices=1, name=f"lookup_{name}")
        label = state["label"]
        if label["task"] == "classification":
            self.label_lookup = layers.StringLookup(vocabulary=label["classes"], num_oov_indices=0, name="lookup_label")

    def build(self, input_shape=None):
        # The sublayers were built in __init__; nothing here depends on the input shape.
        self.built = True

    def call(self, inputs):
        encoded = {}
        if self.numeric_names:
            numeric = tf.stack([tf.cast(inputs[name], tf.float32) for name in self.numeric_names], axis=-1)
            numeric = tf.where(tf.math.is_nan(numeric), self._means, numeric)
            encoded[NUMERIC] = self.normalization(numeric)
        for name, lookup in self.lookups.items():
            encoded[name] = lookup(inputs[name])
        return encoded

    def encode_label(self, label):
        """The training target: a class index, or the (scaled) regression value."""
        info = self.state["label"]
        if info["task"] == "classification":
            return self.label_lookup(label)
        if info["scaling"] == "standardize":
            return (tf.cast(label, tf.float32) - info["mean"]) / info["std"]
        return tf.cast(label, tf.float32)

    def get_config(self):
        return {**super().get_config(), "state": self.state}

    def vocabulary_sizes(self) -> dict[str, int]:
        """Indices each categorical feature can take: vocabulary + 1 OOV index."""
        return {name: lookup.vocabulary_size() for name, lookup in self.lookups.items()}


def label_output_layer(state: dict[str, Any]) -> layers.Layer | None:
    """The layer that maps the training model's output back to label units, if any."""
    label = state["label"]
    if label["task"] == "regression" and label["scaling"] == "standardize":
        return layers.Rescaling(scale=label["std"], offset=label["mean"], name="unscale_label")
    return None


def raw_inputs(state: dict[str, Any]) -> dict[str, keras.KerasTensor]:
    """One ``keras.Input`` per raw feature, shape ``[batch]``, in the serving dtypes."""
    dtypes = {"numeric": "float32", "categorical": "string", "integer_categorical": "int64"}
    return {
        name: keras.Input(shape=(), dtype=dtypes[feature["kind"]], name=name)
        for name, feature in state["features"].items()
    }


def build_inference_model(state: dict[str, Any], training_model: keras.Model) -> keras.Model:
    """Raw features in, predictions in label units out: preprocessing + the trained model."""
    inputs = raw_inputs(state)
    outputs = training_model(FeaturePreprocessor(state, name="preprocess")(inputs))
    unscale = label_output_layer(state)
    if unscale is not None:
        outputs = unscale(outputs)
    return keras.Model(inputs, outputs, name="inference_model")
