"""Model parts: how a training model turns an encoded input of its own form into a vector.

Numbers, indices and vectors (:class:`tfjobs.features.Encoded`) go straight into
:class:`tfjobs.modeling.layers.FeatureVector`. A feature kind whose model input is
something else (a token sequence, an image) names a form, and a builder registered
here for that form makes the Keras layer that turns the input into one vector per
row (an embedding and a pooling, a small CNN); the feature vector puts it beside
the others, so every model kind takes every form::

    @register_part("sequence")
    def sequence_part(name: str, config: dict) -> keras.layers.Layer: ...

``config`` is the feature's :class:`~tfjobs.features.Encoded` as a dict (``form``,
``shape``, ``size``, ``embedding_dim``, ...). The layer must be registered for
serialization and report its output width through ``compute_output_shape``.

Registered here: ``token_sequence``, a text feature's token ids (its ``int`` output),
made a vector by :class:`~tfjobs.modeling.layers.TokenSequenceEncoder`.
"""

from __future__ import annotations

from collections.abc import Callable

from tfjobs.features.text import TOKEN_SEQUENCE

PART_BUILDERS: dict[str, Callable] = {}


def register_part(form: str):
    """Register ``build(name, config) -> keras.layers.Layer`` for the inputs of ``form``."""

    def decorator(build):
        PART_BUILDERS[form] = build
        return build

    return decorator


def build_part(name: str, config: dict):
    """The part for feature ``name``, whose encoded input is described by ``config``."""
    form = config["form"]
    if form not in PART_BUILDERS:
        raise ValueError(
            f"Feature {name!r} reaches the model as {form!r}, and no model part is registered for that form "
            f"(registered: {sorted(PART_BUILDERS)}): import the module that registers it"
        )
    return PART_BUILDERS[form](name, config)


def part_width(layer, config: dict) -> int:
    """The width of the vector a part gives for one row."""
    return int(layer.compute_output_shape((None, *config["shape"]))[-1])


@register_part(TOKEN_SEQUENCE)
def token_sequence_part(name: str, config: dict):
    """A text feature's token ids (``int`` output): an embedding of ``size`` ids, then the masked pooling (or the
    Conv1D) its ``encoding`` names, to one vector."""
    from tfjobs.modeling.layers import TokenSequenceEncoder

    return TokenSequenceEncoder(config["size"], config["embedding_dim"], config["encoding"],
                                name=f"tokens_{name}")
