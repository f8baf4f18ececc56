"""Keras preprocessing built from the adapted state, shared by training and serving.

:class:`FeaturePreprocessor` turns raw features (what the serving signature takes:
a dict of 1-D tensors) into what a training model eats. It iterates the state's
features and asks each one's kind (:mod:`tfjobs.features`) to clean the value
(strip it, make NA tokens missing) and encode it with its Keras layers; numbers are
stacked under ``NUMBERS``, indices and vectors keep their feature's name, crosses
hash the indices of their features.

The same layer object runs in the tf.data input pipeline during training and inside
the exported inference model, so training and serving cannot drift apart. It keeps
its whole state in ``get_config`` and rebuilds its layers from it, so ``.keras``
files (an exported ``model.keras`` included) reload without ``custom_objects`` once
this module is imported.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import layers

import tfjobs.modeling.models  # noqa: F401  (registers the training models' layers: an inference model holds both)
from tfjobs.features.base import NUMBERS, Encoded, feature_from_state
from tfjobs.features.crosses import Cross
from tfjobs.storage.examples import tf_dtype


@keras.saving.register_keras_serializable(package="shardline")
class FeaturePreprocessor(layers.Layer):
    """Raw feature dict -> ``{NUMBERS: [batch, k] float32, <index>: [batch] int64, <vector>: [batch, n] float32}``."""

    def __init__(self, state: dict[str, Any], **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        self.state = state
        self.na_values = list(state.get("na_values", []))
        self.features = [feature_from_state(name, entry) for name, entry in state["features"].items()]
        self.crosses = [Cross(**cross) for cross in state.get("crosses", [])]
        # Built now, eagerly: built lazily inside a tf.data map, their constants would belong to that graph.
        # One flat dict of layers, "<feature>.<i>": what Keras and TensorFlow track (lookup tables in a SavedModel).
        self.encoder_layers = {f"{f.name}.{i}": layer for f in self.features
                               for i, layer in enumerate(f.encoder_layers(state["features"][f.name]))}
        self.crossing_layers = {c.name: c.crossing_layer() for c in self.crosses}
        label = state["label"]
        if label["task"] == "classification":
            self.label_lookup = layers.StringLookup(vocabulary=label["classes"], num_oov_indices=0, name="lookup_label")

    def build(self, input_shape=None):
        # The sublayers were built in __init__; nothing here depends on the input shape.
        self.built = True

    @property
    def numbers(self) -> list[str]:
        """The features stacked under ``NUMBERS``, in their column order."""
        return [f.name for f in self.features if f.encoded(self.state["features"][f.name]).form == "number"]

    @property
    def encodings(self) -> dict[str, Encoded]:
        """What each model input is, in order: one per feature (numbers stacked under NUMBERS), then the crosses."""
        numbers = 0
        out: dict[str, Encoded] = {}
        for feature in self.features:
            encoded = feature.encoded(self.state["features"][feature.name])
            if encoded.form == "number":
                numbers += 1
            else:
                out[feature.name] = encoded
        out.update({cross.name: cross.encoded() for cross in self.crosses})
        return {NUMBERS: Encoded("vector", numbers), **out} if numbers else out

    def call(self, inputs):
        encoded, numbers = {}, []
        for feature in self.features:
            state = self.state["features"][feature.name]
            values = feature.clean_tensor(inputs[feature.name], self.na_values)
            value = feature.encode(values, self._layers_of(feature.name), state)
            if feature.encoded(state).form == "number":
                numbers.append(value)
            else:
                encoded[feature.name] = value
        for cross in self.crosses:
            crossed = self.crossing_layers[cross.name](tuple(encoded[name] for name in cross.features))
            encoded[cross.name] = tf.cast(crossed, tf.int64)
        if numbers:
            encoded[NUMBERS] = tf.stack(numbers, axis=-1)
        return encoded

    def _layers_of(self, name: str) -> list:
        return [layer for key, layer in self.encoder_layers.items() if key.rpartition(".")[0] == name]

    def parse_text(self, texts: dict):
        """Raw CSV text per feature -> what the serving signature takes (``serving_raw``)."""
        return {f.name: f.parse_text(texts[f.name], self.na_values) for f in self.features}

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

    def encoded_row_bytes(self) -> int:
        """Bytes one preprocessed row takes in memory: float32 numbers and vectors, int64 indices, other
        forms by their shape and dtype, and the label."""
        def size(e: Encoded) -> int:
            if e.form == "index":
                return 8
            if e.form in ("number", "vector"):
                return 4 * e.size
            return int(np.prod(e.shape, dtype=np.int64)) * tf.dtypes.as_dtype(e.dtype).size

        return 8 + sum(size(e) for e in self.encodings.values())


def serving_inputs(state: dict[str, Any]) -> dict[str, tf.TensorSpec]:
    """The serving signature: one 1-D tensor per raw feature, in its kind's serving dtype."""
    return {name: tf.TensorSpec([None], tf_dtype(feature_from_state(name, entry).serving().dtype), name=name)
            for name, entry in state["features"].items()}


def label_output_layer(state: dict[str, Any]) -> layers.Layer | None:
    """The layer that maps the training model's output back to label units, if any."""
    label = state["label"]
    if label["task"] == "regression" and label["scaling"] == "standardize":
        return layers.Rescaling(scale=label["std"], offset=label["mean"], name="unscale_label")
    return None


def raw_inputs(state: dict[str, Any]) -> dict[str, keras.KerasTensor]:
    """One ``keras.Input`` per raw feature, shape ``[batch]``, in the serving dtypes."""
    return {name: keras.Input(shape=(), dtype=spec.dtype, name=name) for name, spec in serving_inputs(state).items()}


def build_inference_model(state: dict[str, Any], training_model: keras.Model) -> keras.Model:
    """Raw features in, predictions in label units out: preprocessing + the trained model."""
    inputs = raw_inputs(state)
    outputs = training_model(FeaturePreprocessor(state, name="preprocess")(inputs))
    unscale = label_output_layer(state)
    if unscale is not None:
        outputs = unscale(outputs)
    return keras.Model(inputs, outputs, name="inference_model")
