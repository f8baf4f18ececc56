"""``integer_categorical``: an integer id (a year, a code), looked up in the training vocabulary or hashed.

Like :mod:`tfjobs.features.categorical` for one value per row, with
``IntegerLookup`` instead of ``StringLookup``: ``encoding: one_hot`` or ``embedding``,
``min_frequency``, ``max_tokens``, or ``num_bins`` to hash ids without a vocabulary.
A missing id (an NA token or an empty cell) is ``-1``, an id of its own; a raw value
that is not a whole number (``1.5``, ``abc``) quarantines its row.

In a record: an ``int64``. Served as ``int64``: a JSON integer, ``-1`` (or null through
``tfjobs.predict``) when missing; or the raw CSV text through ``serving_raw``.
"""

from __future__ import annotations

import numpy as np

from tfjobs.features.base import (
    Cleaned,
    ServingInput,
    as_text,
    strip_and_mark_missing,
    strip_and_mark_missing_tensor,
)
from tfjobs.features.categorical import Categorical, LookupOptions

#: The id a missing value takes in records and in the vocabulary.
MISSING_INTEGER = -1


class IntegerCategorical(Categorical):
    kind = "integer_categorical"
    summary = "an integer id; looked up in the training vocabulary or hashed"
    Options = LookupOptions
    missing_value = MISSING_INTEGER
    storage_dtype = "int64"

    @property
    def tensor_dtype(self):
        import tensorflow as tf

        return tf.int64

    def serving(self) -> ServingInput:
        return ServingInput("int64", "a JSON integer; -1 (or null through tfjobs.predict) when missing")

    def tokens(self, value) -> list:
        return [int(value)]

    def clean(self, raw, na_values) -> Cleaned:
        import pandas as pd

        values, missing = strip_and_mark_missing(raw, na_values)
        parsed = pd.to_numeric(values.where(~missing), errors="coerce").astype("float64").to_numpy()
        unparseable = ~missing & ~np.isfinite(parsed)
        fractional = ~missing & ~unparseable & (parsed != np.round(parsed))
        too_large = ~missing & ~unparseable & (np.abs(parsed) >= 2.0**63)  # would wrap around in int64
        rejected = missing | unparseable | fractional | too_large
        ids = np.where(rejected, MISSING_INTEGER, np.nan_to_num(parsed)).astype(np.int64)
        return Cleaned(ids, missing, [(unparseable, "cannot parse {value} as a number"),
                                      (fractional, "{value} is not an integer"),
                                      (too_large, "{value} is not a 64-bit integer")])

    def parse_text(self, text, na_values):
        import tensorflow as tf

        values, missing = strip_and_mark_missing_tensor(text, na_values)
        # Parsed as a float, as validate parses it ("3.0" is 3); a fraction fails loudly, as validate rejects it.
        numbers = tf.strings.to_number(tf.where(missing, "-1", values), tf.float64)
        tf.debugging.assert_equal(numbers, tf.round(numbers), message=f"{self.name}: a value is not an integer")
        return tf.cast(numbers, tf.int64)

    def clean_tensor(self, values, na_values):
        return values  # an id is served as an integer: nothing to strip

    def lookup_layer(self, vocabulary: list, output_mode: str = "int"):
        from keras import layers

        return layers.IntegerLookup(vocabulary=vocabulary, num_oov_indices=1, output_mode=output_mode,
                                    name=f"lookup_{self.name}")

    def text_variants(self, values, na_values) -> list[str]:
        values = np.asarray(values, np.int64)
        return as_text([str(v) for v in values.tolist()], values == MISSING_INTEGER, na_values)

    def edge_values(self, state: dict) -> list:
        return [MISSING_INTEGER, 987_654_321]
