"""Training models, built from the spec and the adapted preprocessing.

A training model takes *encoded* features (what
:class:`tfjobs.preprocessing.FeaturePreprocessor` outputs) and is written with
backend-agnostic Keras (``keras.layers``, ``keras.ops``): string lookups stay in
the input pipeline and in the exported inference model, so the same model also
trains under ``KERAS_BACKEND=jax``.

Model kinds are registered by name with :func:`register_model`; the spec's
``model.kind`` (or the ``model`` Param in the Airflow UI) picks one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers, ops

from tfjobs import choices
from tfjobs.spec import ModelSpec, PipelineSpec

NUMERIC = "numeric"  # the key of the stacked numeric features in the encoded inputs


@dataclass(frozen=True)
class ModelKind:
    name: str
    description: str
    build: Callable[..., keras.Model]


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model(name: str):
    """Register a builder ``build(inputs, features, model_spec, outputs) -> keras.Model``.

    ``name`` must be listed, with its description, in :data:`tfjobs.choices.MODEL_KINDS`.
    """
    if name not in choices.MODEL_KINDS:
        raise ValueError(f"Model kind {name!r} is not described in tfjobs.choices.MODEL_KINDS")

    def decorator(build):
        MODEL_KINDS[name] = ModelKind(name, choices.MODEL_KINDS[name], build)
        return build

    return decorator


@dataclass(frozen=True)
class EncodedFeatures:
    """What the training model's inputs are: names, vocabulary sizes, encodings."""

    numeric: int  # how many numeric columns are stacked under "numeric"
    vocabulary_sizes: dict[str, int]
    encodings: dict[str, str]  # categorical name -> one_hot | embedding
    embedding_dims: dict[str, int]


def encoded_features(spec: PipelineSpec, preprocessor) -> EncodedFeatures:
    categorical = [f for f in spec.features if f.is_categorical]
    return EncodedFeatures(
        numeric=len(preprocessor.numeric_names),
        vocabulary_sizes=preprocessor.vocabulary_sizes(),
        encodings={f.name: f.encoding for f in categorical},
        embedding_dims={f.name: f.embedding_dim for f in categorical},
    )


def model_inputs(features: EncodedFeatures) -> dict[str, keras.KerasTensor]:
    inputs = {}
    if features.numeric:
        inputs[NUMERIC] = keras.Input(shape=(features.numeric,), dtype="float32", name=NUMERIC)
    for name in features.vocabulary_sizes:
        inputs[name] = keras.Input(shape=(), dtype="int64", name=name)
    return inputs


def feature_vector(inputs: dict, features: EncodedFeatures):
    """Numeric columns and every categorical one-hot or embedded, side by side."""
    parts = [inputs[NUMERIC]] if features.numeric else []
    for name, size in features.vocabulary_sizes.items():
        if features.encodings[name] == "embedding":
            parts.append(layers.Embedding(size, features.embedding_dims[name], name=f"embed_{name}")(inputs[name]))
        else:
            parts.append(ops.one_hot(inputs[name], size))
    return parts[0] if len(parts) == 1 else layers.Concatenate(name="features")(parts)


def output_head(x, outputs: int):
    """Class probabilities for classification (outputs > 1), one linear unit for regression."""
    if outputs > 1:
        return layers.Dense(outputs, activation="softmax", name="probabilities")(x)
    return layers.Dense(1, name="prediction")(x)


@register_model("mlp")
def build_mlp(inputs: dict, features: EncodedFeatures, model_spec: ModelSpec, outputs: int) -> keras.Model:
    x = feature_vector(inputs, features)
    for i, units in enumerate(model_spec.hidden_units):
        x = layers.Dense(units, activation="relu", name=f"dense_{i}")(x)
        if model_spec.dropout:
            x = layers.Dropout(model_spec.dropout, name=f"dropout_{i}")(x)
    return keras.Model(inputs, output_head(x, outputs), name="mlp")


def build_training_model(spec: PipelineSpec, features: EncodedFeatures, kind: str = "") -> keras.Model:
    kind = kind or spec.model.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"Unknown model kind {kind!r}; registered kinds: {sorted(MODEL_KINDS)}")
    outputs = len(spec.label.classes) if spec.label.task == "classification" else 1
    return MODEL_KINDS[kind].build(model_inputs(features), features, spec.model, outputs)
