"""Training models, built from the spec and the adapted preprocessing.

A training model takes *encoded* features (what
:class:`tfjobs.features.preprocessing.FeaturePreprocessor` outputs: numbers stacked,
indices for one-hot or embeddings, multi-hot vectors) and is written with
backend-agnostic Keras (``keras.layers``, ``keras.ops``): string lookups stay in
the input pipeline and in the exported inference model, so the same model also
trains under ``KERAS_BACKEND=jax``.

Model kinds are registered by name with :func:`register_model`; the spec's
``model.kind`` (or the ``model`` Param in the Airflow UI) picks one. Besides the
functional ``mlp``, the subclassed models of :mod:`tfjobs.modeling.subclassed_models`
(``residual``, ``wide_deep``, ``reconstruction``) take their options from the
spec's ``model:`` section.

Importing this module registers every Shardline Keras object a training model can
hold (layers, models, losses, metrics), so a ``training_model.keras`` file reloads
in a fresh process after ``import tfjobs.modeling.models``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
from keras import layers

from tfjobs import choices
from tfjobs.modeling import image_part, losses, metrics  # noqa: F401  (compile configs; the image model part)
from tfjobs.features import NUMBERS
from tfjobs.modeling.layers import FeatureVector
from tfjobs.spec import ModelSpec, PipelineSpec
from tfjobs.modeling.subclassed_models import ReconstructingModel, ResidualModel, WideAndDeepModel


@dataclass(frozen=True)
class ModelKind:
    name: str
    description: str
    build: Callable[..., keras.Model]
    options: tuple[str, ...] = ()  # the spec's model options this kind reads


MODEL_KINDS: dict[str, ModelKind] = {}


def register_model(name: str, options: tuple[str, ...] = ()):
    """Register a builder ``build(inputs, features, model_spec, outputs) -> keras.Model``.

    ``name`` must be listed, with its description, in :data:`tfjobs.choices.MODEL_KINDS`;
    ``options`` names the extra ``model:`` settings of the spec the builder reads.
    """
    if name not in choices.MODEL_KINDS:
        raise ValueError(f"Model kind {name!r} is not described in tfjobs.choices.MODEL_KINDS")

    def decorator(build):
        MODEL_KINDS[name] = ModelKind(name, choices.MODEL_KINDS[name], build, tuple(options))
        return build

    return decorator


@dataclass(frozen=True)
class EncodedFeatures:
    """What the training model's inputs are, as the features' kinds encode them (``FeaturePreprocessor.encodings``).

    ``numeric_width`` numbers stacked under ``NUMBERS``; an index per feature in ``index_sizes``
    (one-hot or embedded, as ``encodings`` says); a vector per feature in ``vector_widths``;
    inputs of other forms in ``parts`` (their :class:`~tfjobs.features.Encoded` as a dict).
    """

    numeric_width: int
    index_sizes: dict[str, int]
    encodings: dict[str, str] = field(default_factory=dict)
    embedding_dims: dict[str, int] = field(default_factory=dict)
    vector_widths: dict[str, int] = field(default_factory=dict)
    parts: dict[str, dict] = field(default_factory=dict)


def encoded_features(preprocessor) -> EncodedFeatures:
    encodings = preprocessor.encodings
    numbers = encodings.get(NUMBERS)
    indices = {name: e for name, e in encodings.items() if e.form == "index"}
    return EncodedFeatures(
        numeric_width=numbers.size if numbers else 0,
        index_sizes={name: e.size for name, e in indices.items()},
        encodings={name: e.encoding for name, e in indices.items()},
        embedding_dims={name: e.embedding_dim for name, e in indices.items()},
        vector_widths={name: e.size for name, e in encodings.items() if e.form == "vector" and name != NUMBERS},
        parts={name: {**dataclasses.asdict(e), "shape": list(e.shape)} for name, e in encodings.items()
               if e.form not in ("number", "index", "vector")},
    )


def model_inputs(features: EncodedFeatures) -> dict[str, keras.KerasTensor]:
    inputs = {}
    if features.numeric_width:
        inputs[NUMBERS] = keras.Input(shape=(features.numeric_width,), dtype="float32", name=NUMBERS)
    for name in features.index_sizes:
        inputs[name] = keras.Input(shape=(), dtype="int64", name=name)
    for name, width in features.vector_widths.items():
        inputs[name] = keras.Input(shape=(width,), dtype="float32", name=name)
    for name, config in features.parts.items():
        inputs[name] = keras.Input(shape=tuple(config["shape"]), dtype=config["dtype"], name=name)
    return inputs


def feature_arguments(features: EncodedFeatures) -> dict:
    """The arguments of :class:`tfjobs.modeling.layers.FeatureVector` and the subclassed models."""
    return dataclasses.asdict(features)


def feature_vector(inputs: dict, features: EncodedFeatures):
    """The numbers, the vectors, and every index one-hot or embedded, side by side."""
    return FeatureVector(**feature_arguments(features), name="features")(inputs)


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


def given_options(model_spec: ModelSpec, *names: str) -> dict:
    """The spec's model options among ``names`` (the model class has the defaults)."""
    return {name: model_spec.options[name] for name in names if name in model_spec.options}


@register_model("residual", options=("repeats", "noise_stddev"))
def build_residual(inputs: dict, features: EncodedFeatures, model_spec: ModelSpec, outputs: int) -> keras.Model:
    """Width: the first of ``hidden_units``."""
    return ResidualModel(
        **feature_arguments(features), output_units=outputs, name="residual",
        units=model_spec.hidden_units[0] if model_spec.hidden_units else 64, dropout=model_spec.dropout,
        **given_options(model_spec, "repeats", "noise_stddev"),
    )


@register_model("wide_deep", options=("wide_penalty", "max_norm"))
def build_wide_deep(inputs: dict, features: EncodedFeatures, model_spec: ModelSpec, outputs: int) -> keras.Model:
    return WideAndDeepModel(
        **feature_arguments(features), output_units=outputs, name="wide_deep", hidden_units=model_spec.hidden_units,
        **given_options(model_spec, "wide_penalty", "max_norm"),
    )


@register_model("reconstruction", options=("noise_stddev", "reconstruction_weight"))
def build_reconstruction(inputs: dict, features: EncodedFeatures, model_spec: ModelSpec, outputs: int) -> keras.Model:
    return ReconstructingModel(
        **feature_arguments(features), output_units=outputs, name="reconstruction",
        hidden_units=model_spec.hidden_units, **given_options(model_spec, "noise_stddev", "reconstruction_weight"),
    )


def build_training_model(spec: PipelineSpec, features: EncodedFeatures, kind: str = "") -> keras.Model:
    kind = kind or spec.model.kind
    if kind not in MODEL_KINDS:
        raise ValueError(f"Unknown model kind {kind!r}; registered kinds: {sorted(MODEL_KINDS)}")
    # The spec's options may serve other kinds (the form can pick any kind), but a name no kind reads is a typo.
    known = {option for registered in MODEL_KINDS.values() for option in registered.options}
    unknown = set(spec.model.options) - known
    if unknown:
        raise ValueError(
            f"The spec's model options {sorted(unknown)} are read by no model kind; known options: {sorted(known)} "
            "(besides kind, hidden_units and dropout)"
        )
    outputs = len(spec.label.classes) if spec.label.task == "classification" else 1
    return MODEL_KINDS[kind].build(model_inputs(features), features, spec.model, outputs)
