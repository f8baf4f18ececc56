"""What every feature kind answers, and the registry that finds a kind by its name.

A :class:`Feature` is one declared column of a spec (``features: {x: {kind: numeric}}``).
Its class is its kind: subclassing :class:`Feature` with a ``kind`` name registers it
(``__init_subclass__``, as TFDS's ``FeatureConnector`` does), so there is no central list
to edit. Each kind answers, in its own module, the questions only it can answer:

===========================  ==============================================================
``Options``                  its spec options and their checks (a pydantic model: a JSON Schema
                             for editors and forms comes with it)
``clean``                    raw CSV strings -> typed values, missing ones marked, bad ones
                             given a reason (validate; pandas, no TensorFlow)
``parse_text``,             the same cleaning inside the model, in TensorFlow: raw CSV text
``clean_tensor``             to the served dtype, and the served value to what the encoder
                             takes (stripped, NA tokens made missing), in training and serving
``column``                   how it is stored in a record (dtype; one value or a list)
``statistics``               its streaming, mergeable adapt state (``update``, ``merge``,
                             ``result``: a readable dict in ``state.json``)
``encoder_layers``,         the Keras layers (built from the adapted state) and the TensorFlow
``encode``                   code from the cleaned value to model input: held by one
                             :class:`~tfjobs.features.preprocessing.FeaturePreprocessor`, the
                             same object in training and serving
``encoded``                  what the model builders receive from it (:class:`Encoded`)
``serving``                  its serving signature: dtype, and how a REST client sends it
``edge_values``              raw values the export's skew check must also try (unseen, missing)
``text_variants``            the same values as CSV text (``serving_raw``; an encoded file as base64)
``profile``, ``drift``       optional: a streaming profile of delivered values (for the run report
                             and drift checks) and the distance between two profiles' results;
                             kinds that do not answer are skipped (:mod:`.profiles`)
===========================  ==============================================================

Nothing here imports TensorFlow at module level: specs are parsed by the Airflow DAG
processor. The kinds import Keras inside the methods that build layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pydantic

from tfjobs.storage.examples import Column

#: The key under which the features whose model input is one number reach the model, stacked ``[batch, k]``.
NUMBERS = "numbers"

#: Where a missing value goes: imputed (a kind-specific value) or the row to the quarantine file.
MISSING_POLICIES = {
    "impute": "the kind's missing value: the training mean for a number, a token of its own for a category",
    "quarantine": "the row goes to the quarantine file with the reason",
}


class KindOptions(pydantic.BaseModel):
    """Options every kind takes; a kind's own ``Options`` adds its fields."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    missing: Literal["impute", "quarantine"] = pydantic.Field(
        "impute", description="impute: the kind's missing value; quarantine: the row is set aside with the reason"
    )
    description: str = pydantic.Field("", description="what the column is, for people")


@dataclass(frozen=True)
class Encoded:
    """What a training model receives from one feature (after its encoder).

    ``number``: one float, stacked with the other features' numbers under ``NUMBERS``;
    ``index``: an integer in ``[0, size)``, one-hot or embedded by the model;
    ``vector``: ``size`` floats (a multi-hot or count vector).
    Any other form (a token sequence, an image: ``shape`` and ``dtype`` say what the
    tensor is) reaches the model through the part registered for that form in
    :mod:`tfjobs.modeling.parts`, which makes it a vector; ``part`` holds the feature's
    settings that part reads (a CNN's filters, its training-time augmentation).
    """

    form: str  # number | index | vector | a form with a model part
    size: int = 1
    encoding: str = "one_hot"  # index: one_hot | embedding
    embedding_dim: int = 8
    shape: tuple[int, ...] = ()  # other forms: the tensor's shape after the batch axis
    dtype: str = "float32"  # other forms: the tensor's dtype
    part: dict[str, Any] = dataclasses.field(default_factory=dict)  # other forms: what their model part reads


@dataclass(frozen=True)
class ServingInput:
    """One input of the serving signature: its dtype (a storage dtype) and how a REST client sends it."""

    dtype: str
    rest: str


@dataclass
class Cleaned:
    """Validate's view of one column: typed values, which were missing, which rows are rejected and why."""

    values: np.ndarray
    missing: np.ndarray  # bool per row
    rejected: list[tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)  # (rows, reason with {value})


class Statistics:
    """A streaming, mergeable adapt state: ``update`` with batches, ``merge`` partial states, ``result``."""

    def update(self, values) -> None:
        raise NotImplementedError

    def merge(self, other: Statistics) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, Any]:
        """The adapted state, JSON-ready, as ``state.json`` shows it."""
        raise NotImplementedError


@dataclass(frozen=True)
class Drift:
    """How far a feature's values moved between two profiles: the measure, its value in [0, 1], what moved."""

    measure: str  # jensen_shannon, l_infinity, ...
    distance: float
    detail: str  # for people: "mean 3.87 -> 5.87, ..." or "'NEAR LAKE' (never seen in training): 0.0% -> 61.2%"


class RunningMoments:
    """Count, mean and sum of squared deviations, min and max, merged batch by batch exactly (Chan et al.)."""

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        if values.size:
            mean = float(values.mean())
            self._add(values.size, mean, float(((values - mean) ** 2).sum()), float(values.min()), float(values.max()))

    def merge(self, other: RunningMoments) -> None:
        if other.count:
            self._add(other.count, other.mean, other.m2, other.min, other.max)

    def _add(self, n: int, mean: float, m2: float, low: float, high: float) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, low), max(self.max, high)

    @property
    def variance(self) -> float:
        return self.m2 / self.count if self.count else 0.0


_KINDS: dict[str, type[Feature]] = {}


class Feature:
    """One declared feature: a name and its kind's options. Subclasses with a ``kind`` are registered."""

    kind: ClassVar[str]
    summary: ClassVar[str]  # one line: what the kind is, for errors and the README
    Options: ClassVar[type[KindOptions]] = KindOptions

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            if cls.kind in _KINDS and _KINDS[cls.kind].__qualname__ != cls.__qualname__:
                raise ValueError(f"Feature kind {cls.kind!r} is already registered by {_KINDS[cls.kind]}")
            _KINDS[cls.kind] = cls

    def __init__(self, name: str, options: KindOptions | None = None):
        self.name = name
        self.options = options if options is not None else self.Options()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.options!r})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and (other.name, other.options) == (self.name, self.options)

    def __hash__(self) -> int:
        return hash((self.kind, self.name, self.options))

    @property
    def missing(self) -> str:
        return self.options.missing

    @property
    def description(self) -> str:
        return self.options.description

    def to_dict(self) -> dict[str, Any]:
        """The declaration as the spec (and ``state.json``) write it."""
        return {"kind": self.kind, **self.options.model_dump()}

    # -- storage -------------------------------------------------------------------------------
    def column(self) -> Column:
        raise NotImplementedError

    # -- validate ------------------------------------------------------------------------------
    def clean(self, raw, na_values: Sequence[str]) -> Cleaned:
        """Raw CSV strings (a pandas Series of ``str``) -> typed values; no TensorFlow."""
        raise NotImplementedError

    # -- inside the model ----------------------------------------------------------------------
    def parse_text(self, text, na_values: Sequence[str]):
        """Raw CSV text (a string tensor) -> the value the serving signature takes, parsed as :meth:`clean` parses.

        The ``serving_raw`` signature runs it; a kind served as a string takes the text as it is.
        """
        return text

    def clean_tensor(self, values, na_values: Sequence[str]):
        """The rest of :meth:`clean`, in TensorFlow, on the served (or stored) value: what the encoder takes."""
        return values

    def serving(self) -> ServingInput:
        raise NotImplementedError

    # -- adapt ---------------------------------------------------------------------------------
    def statistics(self) -> Statistics:
        raise NotImplementedError

    def encoded(self, state: dict) -> Encoded:
        raise NotImplementedError

    def encoder_layers(self, state: dict) -> list:
        """The Keras layers its encoding needs, built from the adapted ``state`` (stock layers where they exist)."""
        return []

    def encode(self, values, encoder_layers: list, state: dict):
        """Cleaned values ``[batch]`` -> this feature's model input (see :meth:`encoded`), with ``encoder_layers``."""
        raise NotImplementedError

    def edge_values(self, state: dict) -> list:
        """Raw values the skew check adds to the test rows: missing, never seen, ..."""
        return []

    def text_variants(self, values, na_values: Sequence[str]) -> list[str]:
        """Raw CSV text that cleans to ``values`` (served values): padded with whitespace, NA tokens for missing.

        The export's skew check sends them through ``serving_raw`` and expects the predictions of ``values``.
        """
        raise NotImplementedError

    def state_summary(self, state: dict) -> str:
        """One line about the adapted state for people (``tfjobs.report``); empty when a kind has nothing to add."""
        return ""

    @property
    def gives_index(self) -> bool:
        """Whether the encoder outputs one index per row: such features can be crossed."""
        return False

    # -- statistics of a delivery (run report, drift) ----------------------------------------
    def profile(self) -> Statistics | None:
        """A streaming, mergeable profile of a delivery's cleaned values (as validate stores them), or None.

        ``update`` takes a batch of stored values (NumPy), ``merge`` another profile of the
        same kind, ``result`` a JSON-ready dict with ``count``, ``missing`` and
        ``missing_share``, plus ``histogram``/``quantiles`` or ``top_values`` to be drawn and
        any other numbers to be listed (:mod:`tfjobs.features.profiles` has profiles to
        reuse: numbers, value counts). None, the default: the kind is not profiled, and the
        statistics step and the drift check skip its features.
        """
        return None

    def drift(self, baseline: dict, current: dict) -> Drift | None:
        """How far ``current`` (a :meth:`profile` result) moved from ``baseline`` (the training data's).

        The spec's ``drift`` thresholds apply to ``Drift.distance``, which must lie in [0, 1].
        None, the default: not measured.
        """
        return None


def kinds() -> dict[str, type[Feature]]:
    """Every registered kind, by name."""
    return dict(_KINDS)


def kind_class(kind: str) -> type[Feature]:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"kind {kind!r} is not one of {sorted(_KINDS)}") from None


class OptionsError(ValueError):
    """A feature's options do not parse; ``errors`` are ``(field path, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{path}: {message}" if path else message for path, message in errors))


def parse_feature(name: str, raw: Any) -> Feature:
    """A feature from its spec mapping (``{kind: numeric, ...}``); errors name the option."""
    if not isinstance(raw, dict) or "kind" not in raw:
        raise OptionsError([("", f"needs a mapping with a 'kind' ({sorted(_KINDS)})")])
    raw = dict(raw)
    kind = raw.pop("kind")
    if kind not in _KINDS:
        raise OptionsError([("kind", f"{kind!r} is not one of {sorted(_KINDS)}")])
    cls = _KINDS[kind]
    try:
        options = cls.Options(**raw)
    except pydantic.ValidationError as err:
        raise OptionsError([(".".join(str(p) for p in e["loc"]), _message(e)) for e in err.errors()]) from None
    return cls(name, options)


def feature_from_state(name: str, entry: dict) -> Feature:
    """The feature a ``state.json`` entry was adapted for (its ``kind`` and ``options``)."""
    return kind_class(entry["kind"])(name, kind_class(entry["kind"]).Options(**entry.get("options", {})))


def _message(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "is not an option of this kind"
    if error["type"] == "literal_error":
        return f"{error['input']!r} is not one of {message.removeprefix('Input should be ')}"
    return f"{message} (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else message


def options_schema() -> dict[str, Any]:
    """A JSON Schema of a feature's mapping: one branch per registered kind, chosen by ``kind``."""
    branches = []
    for kind, cls in sorted(_KINDS.items()):
        schema = cls.Options.model_json_schema()
        schema["properties"] = {"kind": {"const": kind, "description": cls.summary}, **schema["properties"]}
        schema["required"] = ["kind", *schema.get("required", [])]
        schema["title"] = kind
        branches.append(schema)
    return {"oneOf": branches}


# -- cleaning shared by the kinds whose raw value is a string -------------------------------------


#: What is stripped from both ends of a raw value: ASCII whitespace, as ``tf.strings.strip`` does.
WHITESPACE = " \t\n\r\x0b\x0c"


def strip_and_mark_missing(raw, na_values: Iterable[str]):
    """pandas: values stripped of surrounding whitespace, and which are missing (an NA token)."""
    values = raw.str.strip(WHITESPACE)
    return values, values.isin(list(na_values)).to_numpy()


def as_text(texts: Iterable[str], missing: Iterable[bool], na_values: Sequence[str]) -> list[str]:
    """Raw CSV text as deliveries vary it: surrounding whitespace of a few sorts; NA tokens in turn for missing."""
    padding = [("", ""), (" ", ""), ("", "\t"), ("  ", " "), ("\t", "\r")]
    tokens = list(na_values) or [""]
    out = []
    for i, (text, is_missing) in enumerate(zip(texts, missing)):
        before, after = padding[i % len(padding)]
        out.append(before + (tokens[i % len(tokens)] if is_missing else text) + after)
    return out


def strip_and_mark_missing_tensor(values, na_values: Sequence[str]):
    """TensorFlow, the same as :func:`strip_and_mark_missing`: (stripped strings, missing mask)."""
    import tensorflow as tf

    values = tf.strings.strip(values)
    tokens = tf.constant(list(na_values) or [""], tf.string)
    missing = tf.reduce_any(tf.equal(tf.expand_dims(values, -1), tokens), axis=-1)
    return values, missing
