"""``numeric``: a float, normalized, rescaled to [0, 1] or discretized into quantile bins.

=============  ====================================  ==================================  ===========
``transform``  encoder (Keras)                       adapted in ``state.json``           model input
=============  ====================================  ==================================  ===========
normalize      ``Normalization(mean, variance)``     mean, variance (and count, min...)  a number
rescale        ``Rescaling(1/(max-min), -min/...)``  min, max                            a number
discretize     ``Discretization(bin_boundaries)``    quantile boundaries (``bins`` - 1)  an index
=============  ====================================  ==================================  ===========

A missing value (NaN; in a CSV, an NA token such as ``NA`` or an empty cell) is
imputed with the training mean before the transform, unless the spec quarantines it.
A discretized feature is one-hot encoded or embedded by the model, and can be crossed.
Values outside the training range rescale outside [0, 1] and fall in the outer bins.

In a record: a ``float32``. Served as ``float32`` (a JSON number; ``NaN`` or, through
``tfjobs.predict``, ``null`` for missing), or as the raw CSV text through ``serving_raw``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pydantic

from tfjobs.features.base import (
    Cleaned,
    Drift,
    Encoded,
    Feature,
    KindOptions,
    RunningMoments,
    ServingInput,
    Statistics,
    as_text,
    strip_and_mark_missing,
    strip_and_mark_missing_tensor,
)
from tfjobs.features.profiles import NumericProfile, describe_numeric_drift, jensen_shannon
from tfjobs.storage.examples import Column

#: Quantile summaries keep about 1 / epsilon points (Keras's Discretization default is 0.01).
QUANTILE_EPSILON = 0.001


class NumericOptions(KindOptions):
    transform: Literal["normalize", "rescale", "discretize"] = pydantic.Field(
        "normalize", description="normalize: (x - mean) / std; rescale: to [0, 1] by the training min and max; "
        "discretize: the index of its quantile bin"
    )
    bins: int = pydantic.Field(10, ge=2, le=10_000, description="discretize: how many bins (equal-count)")
    encoding: Literal["one_hot", "embedding"] = pydantic.Field("one_hot", description="discretize: how the bin reaches the model")
    embedding_dim: int = pydantic.Field(8, ge=1, le=1024, description="discretize with encoding embedding: its width")

    @pydantic.model_validator(mode="after")
    def _discretize_options_need_discretize(self):
        misplaced = {"bins", "encoding", "embedding_dim"} & self.model_fields_set
        if misplaced and self.transform != "discretize":
            raise ValueError(f"{sorted(misplaced)} apply to transform: discretize, not {self.transform!r}")
        return self


class NumericStatistics(Statistics):
    """Moments, min and max of the values present, the missing count; quantiles when there are ``bins``."""

    def __init__(self, name: str = "", bins: int = 0):
        self.name = name
        self.moments = RunningMoments()
        self.missing = 0
        self.quantiles = None
        if bins:
            import keras

            # Keras's own streaming quantile summary (what Discretization.adapt() runs), batch by batch.
            self.quantiles = keras.layers.Discretization(num_bins=bins, epsilon=QUANTILE_EPSILON)

    def update(self, values) -> None:
        values = np.asarray(values, np.float64)
        present = values[~np.isnan(values)]
        self.missing += int(values.size - present.size)
        self.moments.update(present)
        if self.quantiles is not None and present.size:
            self.quantiles.update_state(present)

    def merge(self, other: NumericStatistics) -> None:
        self.missing += other.missing
        self.moments.merge(other.moments)
        if self.quantiles is not None and other.quantiles is not None:
            from keras.src.layers.preprocessing.discretization import merge_summaries

            self.quantiles.summary = merge_summaries(self.quantiles.summary, other.quantiles.summary,
                                                     QUANTILE_EPSILON)

    def result(self) -> dict:
        moments = self.moments
        if moments.count == 0:
            raise ValueError(f"Feature {self.name!r} has no values in the train split: cannot adapt it")
        state = {"count": moments.count, "missing": self.missing, "mean": moments.mean,
                 "variance": moments.variance, "min": moments.min, "max": moments.max}
        if self.quantiles is not None:
            self.quantiles.finalize_state()
            # Boundaries at the quantiles 1/bins, 2/bins, ...; equal ones (a value repeated a lot) merged.
            state["boundaries"] = sorted({float(b) for b in self.quantiles.bin_boundaries})
        return state


class Numeric(Feature):
    kind = "numeric"
    summary = "a float; normalized, rescaled to [0, 1] or discretized by the training data"
    Options = NumericOptions

    def column(self) -> Column:
        return Column(self.name, "float32")

    def serving(self) -> ServingInput:
        return ServingInput("float32", "a JSON number; NaN (or null through tfjobs.predict) when missing")

    # -- cleaning: the same rules in pandas (validate) and in TensorFlow (the model) -------------------
    def clean(self, raw, na_values) -> Cleaned:
        import pandas as pd

        values, missing = strip_and_mark_missing(raw, na_values)
        parsed = pd.to_numeric(values.where(~missing), errors="coerce").astype("float64").to_numpy()
        unparseable = ~missing & np.isnan(parsed)
        with np.errstate(over="ignore"):  # 1e39 is a float64, and infinite as the float32 stored
            stored = parsed.astype(np.float32)
        infinite = ~missing & ~unparseable & ~np.isfinite(stored)
        cleaned = Cleaned(np.where(unparseable | infinite, np.nan, stored), missing)
        cleaned.rejected.append((unparseable, "cannot parse {value} as a number"))
        cleaned.rejected.append((infinite, "{value} is not a finite float32"))
        return cleaned

    def parse_text(self, text, na_values):
        import tensorflow as tf

        values, missing = strip_and_mark_missing_tensor(text, na_values)
        # An NA token becomes "nan" before parsing: to_number fails loudly on anything else it cannot parse.
        return tf.strings.to_number(tf.where(missing, "nan", values), tf.float32)

    # -- adapt and encode ------------------------------------------------------------------------------
    def statistics(self) -> NumericStatistics:
        return NumericStatistics(self.name, self.options.bins if self.options.transform == "discretize" else 0)

    def encoded(self, state: dict) -> Encoded:
        if self.options.transform == "discretize":
            return Encoded("index", len(state["boundaries"]) + 1, self.options.encoding, self.options.embedding_dim)
        return Encoded("number")

    @property
    def gives_index(self) -> bool:
        return self.options.transform == "discretize"

    def encoder_layers(self, state: dict) -> list:
        from keras import layers

        transform = self.options.transform
        if transform == "normalize":
            normalization = layers.Normalization(axis=None, mean=state["mean"], variance=state["variance"],
                                                 name=f"normalize_{self.name}")
            # Built now, eagerly: built lazily inside a tf.data map, its constants would belong to that graph.
            normalization.build((None,))
            return [normalization]
        if transform == "rescale":
            span = state["max"] - state["min"]
            scale = 1.0 / span if span > 0 else 0.0
            return [layers.Rescaling(scale, offset=-state["min"] * scale, name=f"rescale_{self.name}")]
        return [layers.Discretization(bin_boundaries=state["boundaries"], name=f"discretize_{self.name}")]

    def encode(self, values, encoder_layers: list, state: dict):
        import tensorflow as tf

        imputed = tf.where(tf.math.is_nan(values), tf.constant(state["mean"], tf.float32), values)
        encoded = encoder_layers[0](imputed)
        return tf.cast(encoded, tf.int64 if self.gives_index else tf.float32)

    def text_variants(self, values, na_values) -> list[str]:
        values = np.asarray(values, np.float32)
        texts = [np.format_float_positional(v, unique=True) for v in values]  # shortest text that parses back
        return as_text(texts, np.isnan(values), na_values)

    def edge_values(self, state: dict) -> list:
        # Missing, and far outside the training range on both sides.
        return [math.nan, state["min"] - 10 * (state["max"] - state["min"] + 1), state["max"] * 10 + 1]

    # -- statistics of a delivery ----------------------------------------------------------------------
    def profile(self) -> NumericProfile:
        return NumericProfile()

    def drift(self, baseline: dict, current: dict) -> Drift:
        return Drift("jensen_shannon", jensen_shannon(baseline, current), describe_numeric_drift(baseline, current))
