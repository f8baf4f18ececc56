"""Feature kinds: one module per kind, each owning everything the pipeline does with its values.

========================  ===================================================================
:mod:`.base`              what a kind answers (:class:`Feature`) and the registry of kinds
:mod:`.numeric`           ``numeric``: normalize, rescale or discretize a float
:mod:`.categorical`       ``categorical``: a string (or a list of them), looked up or hashed
:mod:`.integer_categorical`  ``integer_categorical``: an integer id, looked up or hashed
:mod:`.image`             ``image``: an encoded image file, decoded and resized inside the model
:mod:`.text`              ``text``: free text, tokenized in the model: token ids or a bag of words
:mod:`.crosses`           the spec's ``crosses:``, hashed crossings of indices
:mod:`.profiles`          profiles of delivered values and their distances (drift), for the kinds to reuse
:mod:`.preprocessing`     the Keras layer that runs every kind, in training and serving
========================  ===================================================================

The pipeline steps (validate, shard, adapt, train, export) iterate over a spec's
features and ask each one; none of them names a kind. A new kind is a module with a
subclass of :class:`Feature` that sets ``kind``: importing it registers it.
"""

from tfjobs.features import categorical, image, integer_categorical, numeric, text  # noqa: F401  (register the kinds)
from tfjobs.features.base import (
    MISSING_POLICIES,
    NUMBERS,
    Cleaned,
    Drift,
    Encoded,
    Feature,
    KindOptions,
    OptionsError,
    ServingInput,
    Statistics,
    feature_from_state,
    kind_class,
    kinds,
    options_schema,
    parse_feature,
)
from tfjobs.features.crosses import Cross

__all__ = [
    "MISSING_POLICIES",
    "NUMBERS",
    "Cleaned",
    "Cross",
    "Drift",
    "Encoded",
    "Feature",
    "KindOptions",
    "OptionsError",
    "ServingInput",
    "Statistics",
    "feature_from_state",
    "kind_class",
    "kinds",
    "options_schema",
    "parse_feature",
]
