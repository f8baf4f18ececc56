"""``categorical``: a string category, looked up in the training vocabulary or hashed; or a list of them.

========================================  ================================  ==========================  ============
spec options                              encoder (Keras)                   adapted in ``state.json``   model input
========================================  ================================  ==========================  ============
``encoding: one_hot`` or ``embedding``    ``StringLookup(vocabulary)``      vocabulary and counts       an index
``num_bins: N``                           ``Hashing(N)``                    rows per bin (how full)     an index
``delimiter: "|"``, ``encoding:           ``StringLookup(output_mode=...)``  token vocabulary, counts    a vector
multi_hot`` or ``count``                  (``Hashing`` with ``num_bins``)
========================================  ================================  ==========================  ============

The vocabulary is most frequent first; values seen fewer than ``min_frequency`` times,
and beyond the ``max_tokens`` most frequent, share the out-of-vocabulary index with
values never seen, so that index is trained. A missing value (an NA token or an empty
cell) is the empty string, a token of its own. Values are stripped of surrounding
whitespace, and NA tokens become the missing value, in validate and inside the model
alike. A multi-valued cell (``"a|b|c"``) is split on the delimiter, each token
stripped, empty and NA tokens dropped; its model input is a multi-hot or count vector.

In a record: the cleaned string (a multi-valued one joined by its delimiter). Served
as a string: a JSON string; a multi-valued one as delivered, ``"a|b|c"``.
"""

from __future__ import annotations

import collections
import logging
from typing import Literal

import numpy as np
import pydantic

from tfjobs.features.base import (
    Cleaned,
    Drift,
    Encoded,
    Feature,
    KindOptions,
    ServingInput,
    Statistics,
    as_text,
    strip_and_mark_missing,
    WHITESPACE,
    strip_and_mark_missing_tensor,
)
from tfjobs.features.profiles import ValueCountsProfile, describe_value_drift, l_infinity
from tfjobs.storage.examples import Column

log = logging.getLogger(__name__)

#: A vocabulary this large without ``max_tokens`` gets a warning: it is probably an id, not a category.
LARGE_VOCABULARY = 10_000
#: The value a missing category takes in records and in the vocabulary.
MISSING_STRING = ""


class LookupOptions(KindOptions):
    """Options of the kinds that look values up in a vocabulary (or hash them)."""

    encoding: Literal["one_hot", "embedding"] = pydantic.Field("one_hot", description="how the index reaches the model")
    embedding_dim: int = pydantic.Field(8, ge=1, le=1024, description="encoding embedding: its width")
    min_frequency: int = pydantic.Field(
        1, ge=1, description="values seen fewer times in training share the out-of-vocabulary index")
    max_tokens: int | None = pydantic.Field(
        None, ge=1, description="keep at most this many most frequent values (the rest share the OOV index)")
    num_bins: int | None = pydantic.Field(
        None, ge=1, le=1 << 24, description="hash values into this many bins instead of a vocabulary (Hashing)")

    @pydantic.model_validator(mode="after")
    def _hashing_has_no_vocabulary(self):
        vocabulary_options = {"min_frequency", "max_tokens"} & self.model_fields_set
        if self.num_bins is not None and vocabulary_options:
            raise ValueError(f"num_bins hashes values without a vocabulary: {sorted(vocabulary_options)} do not apply")
        if "embedding_dim" in self.model_fields_set and self.encoding != "embedding":
            raise ValueError(f"embedding_dim applies to encoding: embedding, not {self.encoding!r}")
        return self


class CategoricalOptions(LookupOptions):
    encoding: Literal["one_hot", "embedding", "multi_hot", "count"] = pydantic.Field(
        "one_hot", description="one_hot or embedding for one value; multi_hot or count for a list (delimiter)")
    delimiter: str = pydantic.Field(
        "", max_length=8, description="the cell is a list of values separated by this, e.g. '|'")

    @pydantic.model_validator(mode="after")
    def _lists_need_a_bag(self):
        bag = self.encoding in ("multi_hot", "count")
        if self.delimiter and not bag:
            raise ValueError(f"a delimited list needs encoding multi_hot or count, not {self.encoding!r}")
        if bag and not self.delimiter:
            raise ValueError(f"encoding {self.encoding} needs a delimiter: the values of one cell form the bag")
        if self.delimiter and self.delimiter.strip(" \t") != self.delimiter:
            raise ValueError(f"delimiter {self.delimiter!r} must not begin or end with whitespace (it is stripped)")
        return self


class VocabularyStatistics(Statistics):
    """Counts per value (mergeable by adding), rows and missing rows; a vocabulary at the end."""

    def __init__(self, feature: Categorical):
        self.feature = feature
        self.counts: collections.Counter = collections.Counter()
        self.rows = 0

    def update(self, values) -> None:
        self.rows += len(values)
        unique, counts = np.unique(np.asarray(values), return_counts=True)
        for value, count in zip(unique.tolist(), counts.tolist()):
            for token in self.feature.tokens(value):
                self.counts[token] += count

    def merge(self, other: VocabularyStatistics) -> None:
        self.counts.update(other.counts)
        self.rows += other.rows

    def result(self) -> dict:
        options = self.feature.options
        missing = self.feature.missing_value
        order = lambda kv: (-kv[1], kv[0])  # noqa: E731  most frequent first, ties by value
        items = sorted(self.counts.items(), key=order)
        single = not self.feature.is_list
        kept = [(k, c) for k, c in items if c >= options.min_frequency and not (single and k == missing)]
        if options.max_tokens is not None:
            kept = kept[: options.max_tokens]
        elif len(kept) > LARGE_VOCABULARY:
            log.warning(
                "%s: %d distinct values in the vocabulary; set max_tokens to cap it, or num_bins to hash them",
                self.feature.name, len(kept),
            )
        if single:  # the missing value always has an index of its own
            kept = sorted([*kept, (missing, self.counts[missing])], key=order)
        left_out = {k: c for k, c in items if k not in dict(kept)}
        state = {
            "vocabulary": [k for k, _ in kept],
            "counts": [c for _, c in kept],
            "rows": self.rows,
            "out_of_vocabulary": {"min_frequency": options.min_frequency, "max_tokens": options.max_tokens,
                                  "values": len(left_out), "occurrences": sum(left_out.values())},
        }
        if single:
            state["missing_token"] = missing
            state["missing"] = self.counts[missing]
        if left_out:
            log.info("%s: %d values (%d occurrences) share the out-of-vocabulary index (min_frequency %d, "
                     "max_tokens %s)", self.feature.name, len(left_out), sum(left_out.values()),
                     options.min_frequency, options.max_tokens)
        return state


class HashedStatistics(Statistics):
    """Rows per hash bin (mergeable by adding): how full the bins are, for choosing ``num_bins``."""

    def __init__(self, feature: Categorical):
        self.feature = feature
        self.bins = np.zeros(feature.options.num_bins, np.int64)
        self.rows = 0
        self.hashing = feature.hashing_layer()  # the encoder's own hash, so the counts are its bins

    def update(self, values) -> None:
        import tensorflow as tf

        self.rows += len(values)
        hashing = self.hashing
        tokens = [t for value in np.asarray(values).tolist() for t in self.feature.tokens(value)]
        if tokens:
            indices = np.asarray(hashing(tf.constant(tokens, dtype=self.feature.tensor_dtype)))
            np.add.at(self.bins, indices, 1)

    def merge(self, other: HashedStatistics) -> None:
        self.bins += other.bins
        self.rows += other.rows

    def result(self) -> dict:
        return {"num_bins": int(len(self.bins)), "bins_used": int((self.bins > 0).sum()), "rows": self.rows,
                "largest_bin": int(self.bins.max(initial=0)), "values_hashed": int(self.bins.sum())}


class Categorical(Feature):
    kind = "categorical"
    summary = "a string category (or a delimited list of them); looked up in the training vocabulary or hashed"
    Options = CategoricalOptions
    missing_value = MISSING_STRING
    storage_dtype = "string"

    @property
    def is_list(self) -> bool:
        return bool(getattr(self.options, "delimiter", ""))

    @property
    def tensor_dtype(self):
        import tensorflow as tf

        return tf.string

    def column(self) -> Column:
        return Column(self.name, self.storage_dtype)

    def serving(self) -> ServingInput:
        if self.is_list:
            return ServingInput("string", f"a JSON string of values separated by {self.options.delimiter!r}")
        return ServingInput("string", "a JSON string; \"\" (or null through tfjobs.predict) when missing")

    def tokens(self, value) -> list:
        """The vocabulary entries one stored (cleaned) value counts for."""
        if isinstance(value, bytes):
            value = value.decode()
        if not self.is_list:
            return [value]
        return value.split(self.options.delimiter) if value else []

    # -- cleaning: the same rules in pandas (validate) and in TensorFlow (the model) -------------------
    def clean(self, raw, na_values) -> Cleaned:
        import pandas as pd

        values, missing = strip_and_mark_missing(raw, na_values)
        if self.is_list:
            na = set(na_values)
            delimiter = self.options.delimiter
            # Each distinct cell is split once.
            canonical = {
                cell: delimiter.join(t for t in (token.strip(WHITESPACE) for token in cell.split(delimiter))
                                     if t and t not in na)
                for cell in pd.unique(values[~missing])
            }
            values = values.map(canonical).where(~missing, MISSING_STRING)
            missing = (values == MISSING_STRING).to_numpy()
        return Cleaned(values.where(~missing, MISSING_STRING).to_numpy(dtype=object), missing)

    def clean_tensor(self, values, na_values):
        import tensorflow as tf

        values, missing = strip_and_mark_missing_tensor(values, na_values)
        values = tf.where(missing, MISSING_STRING, values)
        if not self.is_list:
            return values
        tokens, dropped = strip_and_mark_missing_tensor(tf.strings.split(values, self.options.delimiter), na_values)
        return tf.ragged.boolean_mask(tokens, tf.logical_not(dropped | tf.equal(tokens, "")))

    # -- adapt and encode ------------------------------------------------------------------------------
    def statistics(self) -> Statistics:
        return HashedStatistics(self) if self.options.num_bins else VocabularyStatistics(self)

    def hashing_layer(self, output_mode: str = "int"):
        from keras import layers

        return layers.Hashing(self.options.num_bins, output_mode=output_mode, name=f"hash_{self.name}")

    def lookup_layer(self, vocabulary: list, output_mode: str = "int"):
        from keras import layers

        return layers.StringLookup(vocabulary=vocabulary, num_oov_indices=1, output_mode=output_mode,
                                   name=f"lookup_{self.name}")

    def encoder_layers(self, state: dict) -> list:
        output_mode = self.options.encoding if self.is_list else "int"
        if self.options.num_bins:
            return [self.hashing_layer(output_mode)]
        return [self.lookup_layer(state["vocabulary"], output_mode)]

    def encoded(self, state: dict) -> Encoded:
        size = self.options.num_bins or len(state["vocabulary"]) + 1  # + the out-of-vocabulary index
        if self.is_list:
            return Encoded("vector", size)
        return Encoded("index", size, self.options.encoding, self.options.embedding_dim)

    @property
    def gives_index(self) -> bool:
        return not self.is_list

    def encode(self, values, encoder_layers: list, state: dict):
        import tensorflow as tf

        return tf.cast(encoder_layers[0](values), tf.float32 if self.is_list else tf.int64)

    def text_variants(self, values, na_values) -> list[str]:
        values = [v.decode() if isinstance(v, bytes) else v for v in values]
        if self.is_list:  # spaces around each value and an empty one at the end: all cleaned away
            d = self.options.delimiter
            values = [f" {d} ".join(v.split(d)) + f"{d} " if v else v for v in values]
        return as_text(values, [v == MISSING_STRING for v in values], na_values)

    # -- statistics of a delivery ----------------------------------------------------------------------
    def profile(self) -> ValueCountsProfile:
        return ValueCountsProfile(self.tokens, self.missing_value)

    def drift(self, baseline: dict, current: dict) -> Drift:
        distance, value = l_infinity(baseline, current)
        return Drift("l_infinity", distance, describe_value_drift(baseline, current, value))

    def edge_values(self, state: dict) -> list:
        if self.is_list:
            d = self.options.delimiter
            return [MISSING_STRING, f"never seen in training{d}another one", f" {d}{d} "]
        return [MISSING_STRING, "<never seen in training>"]

