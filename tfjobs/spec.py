"""Pipeline specs: one declarative YAML file per dataset.

A spec says where a dataset comes from, what its columns are and how to treat
them, which column is the label, how to split and shard it, and which model and
training defaults to use. Every job reads the same spec, so adding a tabular
dataset takes a spec file in ``include/`` and a short DAG file, no code.

This module imports no TensorFlow: the Airflow DAG processor loads specs while
parsing DAG files.

Example (``include/penguins.yaml``)::

    name: penguins
    source: {kind: palmerpenguins}
    label: {name: species, task: classification, classes: [Adelie, Chinstrap, Gentoo]}
    features:
      bill_length_mm: {kind: numeric}
      island: {kind: categorical}

Each feature's ``kind`` and options are parsed by its kind (:mod:`tfjobs.features`);
``python -m tfjobs.spec --schema`` prints the JSON Schema of a spec file, with every
kind's options, for editors (``include/spec.schema.json``).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from tfjobs import choices
from tfjobs.deadlines import parse_duration
from tfjobs.features import Cross, Feature, OptionsError, options_schema, parse_feature
from tfjobs.storage.examples import Column

TASKS = ("classification", "regression")
LABEL_SCALINGS = ("none", "standardize")
SOURCE_KINDS = ("palmerpenguins", "sklearn", "tfds", "csv", "landing", "image_folder")
#: How quotes are read in a delivered file: ``minimal``, a field in double quotes may hold the delimiter,
#: quotes (doubled) and line breaks (RFC 4180); ``none``, a quote is a character like any other.
QUOTING = {"minimal": csv.QUOTE_MINIMAL, "none": csv.QUOTE_NONE}
SPLITS = ("train", "eval", "test")
#: The raw column that carries each row's split when the source assigns them (``source.splits``).
SOURCE_SPLIT_COLUMN = "_split"


class SpecError(ValueError):
    """A spec file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class LabelSpec:
    name: str
    task: str
    classes: tuple[str, ...] = ()
    scaling: str = "none"  # regression: none | standardize

    @property
    def dtype(self) -> str:
        """The label's storage dtype: a class name, or a float."""
        return "string" if self.task == "classification" else "float32"


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    uri: str = ""  # csv: a path, file://, http(s):// or s3:// URI; landing, image_folder: a prefix; tfds: data_dir
    name: str = ""  # sklearn/tfds: the dataset's name
    split: str = "train"  # tfds: which split (or slice: "train[:90%]") to take
    # tfds: the TFDS split or slice that fills each Shardline split, instead of the hash split:
    # {train: "train[:90%]", eval: "train[90%:]", test: test}
    splits: dict[str, str] = field(default_factory=dict)
    pattern: str = "{partition}.csv"  # landing: the file name of one day's delivery
    # Landing (or a source_uri with {partition}): how long after the end of its day a partition's
    # delivery may come, and how often to look for it meanwhile (tfjobs.deadlines.parse_duration).
    deadline: str = "6h"
    poke_interval: str = "5m"
    # csv and landing: how the delivered file is laid out, as real deliveries come (tab-separated,
    # no header, quotes inside the text, another encoding). A run's own source URI keeps them.
    delimiter: str = ","
    quoting: str = "minimal"  # see QUOTING
    header: bool = True  # the first line names the columns; without one, column_names does
    column_names: tuple[str, ...] = ()
    encoding: str = "utf-8"  # bytes that do not decode quarantine their row
    archive_member: str = ""  # when the file fetched is a zip archive: the file in it to read

    def csv_dialect(self) -> dict[str, Any]:
        """The delimiter and quoting, as Python's ``csv`` module and ``pandas.read_csv`` both take them."""
        return {"delimiter": self.delimiter, "quoting": QUOTING[self.quoting]}

    def columns_of(self, header: list[str] | None) -> list[str]:
        """The columns of a delivered file: its header's, or the spec's ``column_names``."""
        return list(header) if self.header else list(self.column_names)


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.8
    eval: float = 0.1
    test: float = 0.1
    # Columns whose values decide a row's split; empty means the whole row, so that
    # duplicate rows always land in the same split.
    key: tuple[str, ...] = ()
    # A raw column that names each row's split (train, eval or test) instead; the fractions
    # then do not apply, and the key only spreads a split's rows over its shards.
    column: str = ""

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "eval": self.eval, "test": self.test}


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    early_stopping_patience: int = 5
    shuffle_buffer: int = 10_000
    seed: int = 42
    loss: str = ""  # one of tfjobs.choices.TASK_LOSSES[task]; empty: the task's default
    huber_delta: float = 1.0  # the Huber loss's threshold, in training label units
    loop: str = "fit"  # fit | custom (tfjobs.custom_loop); see tfjobs.choices.TRAINING_LOOPS
    wide_learning_rate: float = 0.01  # custom loop: SGD's learning rate for a wide & deep model's wide part
    jit_compile: str = "auto"  # auto | true | false: XLA for the training step
    # The same seed gives the same weights (TensorFlow backend): seeded ops, deterministic kernels and an
    # input pipeline whose parallel steps keep their order. Slower: tf.data may not hand over whichever
    # element is ready first, and some kernels have slower deterministic versions (on a GPU especially).
    deterministic: bool = False

    def __post_init__(self):
        object.__setattr__(self, "jit_compile", str(self.jit_compile).lower())
        if not isinstance(self.deterministic, bool):
            raise SpecError(f"training.deterministic must be true or false, got {self.deterministic!r}")
        if self.loop not in choices.TRAINING_LOOPS:
            raise SpecError(f"training.loop {self.loop!r} is not one of {sorted(choices.TRAINING_LOOPS)}")
        if self.loss and self.loss not in choices.LOSSES:
            raise SpecError(f"training.loss {self.loss!r} is not one of {sorted(choices.LOSSES)}")
        if self.jit_compile not in choices.JIT_COMPILE:
            raise SpecError(f"training.jit_compile {self.jit_compile!r} is not one of {choices.JIT_COMPILE}")
        for name in ("huber_delta", "wide_learning_rate"):
            if not getattr(self, name) > 0:
                raise SpecError(f"training.{name} must be positive, got {getattr(self, name)!r}")

    def loss_for(self, task: str) -> str:
        """The loss to train with: the one set, or the task's default; an error if the task cannot use it."""
        allowed = choices.TASK_LOSSES[task]
        if not self.loss:
            return allowed[0]
        if self.loss not in allowed:
            raise SpecError(f"training.loss {self.loss!r} does not fit a {task} task; choose one of {list(allowed)}")
        return self.loss

    def with_overrides(self, overrides: dict[str, Any] | None) -> TrainingSpec:
        """A copy with ``overrides`` applied, each coerced to the field's type.

        Overrides come from Airflow Params, which arrive as JSON values or, when
        templated, as strings; unknown keys are an error so that a typo in a Param
        name never goes unnoticed.
        """
        if not overrides:
            return self
        types = {f.name: f.type for f in dataclasses.fields(self)}
        changes = {}
        for key, value in overrides.items():
            if key not in types:
                raise SpecError(f"Unknown training setting {key!r}; known settings: {sorted(types)}")
            caster = {"int": int, "float": float, "str": str, "bool": self._boolean}[types[key]]
            try:
                changes[key] = caster(value)
            except (TypeError, ValueError):
                raise SpecError(f"Training setting {key!r} must be {types[key]}, got {value!r}") from None
        return dataclasses.replace(self, **changes)

    @staticmethod
    def _boolean(value: Any) -> bool:
        """A Param's or ``--set``'s true/false, as JSON or as text."""
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in ("true", "false"):
            return str(value).strip().lower() == "true"
        raise ValueError(value)


@dataclass(frozen=True)
class ModelSpec:
    kind: str = "mlp"
    hidden_units: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationSpec:
    # A model is "blessed" (and exported) only if every bound holds on the test split.
    min: dict[str, float] = field(default_factory=dict)  # e.g. {accuracy: 0.9}
    max: dict[str, float] = field(default_factory=dict)  # e.g. {rmse: 70000}
    # ... and, when a model is in production, if each metric changed by no more than this against it on the same
    # test rows, in the metric's own direction (tfjobs.evaluate): {accuracy: -0.01} may lose 0.01, {rmse: +500}
    # may grow by 500; {accuracy: 0.01} must gain 0.01.
    change: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for name, bounds in (("min", self.min), ("max", self.max), ("change", self.change)):
            if not isinstance(bounds, dict) or not all(isinstance(v, (int, float)) for v in bounds.values()):
                raise SpecError(f"evaluation.{name} must map metric names to numbers, got {bounds!r}")


DRIFT_ACTIONS = ("warn", "stop")


@dataclass(frozen=True)
class DriftSpec:
    """How far a delivery's per-feature statistics may move from those the production model was trained on.

    Each kind measures its own distance (:meth:`tfjobs.features.Feature.drift`: Jensen-Shannon divergence
    for numbers, L-infinity for categories, both in [0, 1]); above its threshold a feature has drifted.
    """

    action: str = "warn"  # warn: log it and go on; stop: fail the statistics step, before training or scoring
    threshold: float = 0.1  # every profiled feature's, unless `features` names it
    features: dict[str, float] = field(default_factory=dict)  # per feature: {median_income: 0.1}

    def __post_init__(self):
        if self.action not in DRIFT_ACTIONS:
            raise SpecError(f"drift.action {self.action!r} is not one of {DRIFT_ACTIONS}")
        for name, value in {"threshold": self.threshold, **self.features}.items():
            if not isinstance(value, (int, float)) or not value > 0:
                raise SpecError(f"drift threshold of {name!r} must be a positive number, got {value!r}")

    def threshold_of(self, feature: str) -> float:
        return float(self.features.get(feature, self.threshold))


@dataclass(frozen=True)
class ServingSpec:
    keep_versions: int = 5  # published versions kept; older ones are pruned, oldest first, never production's

    def __post_init__(self):
        if not isinstance(self.keep_versions, int) or self.keep_versions < 1:
            raise SpecError(f"serving.keep_versions must be a positive integer, got {self.keep_versions!r}")


@dataclass(frozen=True)
class ScoringSpec:
    # Columns of a scoring delivery copied into its predictions beside the CSV line (an id, a key).
    key: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    source: SourceSpec
    label: LabelSpec
    features: tuple[Feature, ...]
    description: str = ""
    crosses: tuple[Cross, ...] = ()
    split: SplitSpec = SplitSpec()
    shards: dict[str, int] = field(default_factory=lambda: {"train": 1, "eval": 1, "test": 1})
    na_values: tuple[str, ...] = ("", "NA", "N/A", "NaN", "nan", "null", "None")
    max_quarantine_fraction: float = 0.1
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    serving_name: str = ""
    drift: DriftSpec = DriftSpec()
    serving: ServingSpec = ServingSpec()
    scoring: ScoringSpec = ScoringSpec()
    tuning: TuningSpec | None = None  # the hyperparameter search (tfjobs.tune); None: the spec does not tune

    @property
    def model_name(self) -> str:
        return self.serving_name or self.name

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the pipeline reads: the features, then the label."""
        return tuple(f.name for f in self.features) + (self.label.name,)

    @property
    def split_columns(self) -> tuple[str, ...]:
        """The raw column that names each row's split, if the spec has one: validated with the rows, not a record's."""
        return (self.split.column,) if self.split.column else ()

    @property
    def binary_features(self) -> list[str]:
        """The features stored as bytes (encoded files such as images), not text."""
        return [f.name for f in self.features if f.column().dtype == "bytes"]

    def feature(self, name: str) -> Feature:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(f"Spec {self.name!r} has no feature {name!r}")

    def record_columns(self) -> list[Column]:
        """The columns a record (and a validated row) holds: each feature's, then the label."""
        return [f.column() for f in self.features] + [Column(self.label.name, self.label.dtype)]

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            **{name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
               for name, value in fields.items()},
            "features": {f.name: f.to_dict() for f in self.features},
            "crosses": [cross.model_dump() for cross in self.crosses],
            "tuning": self.tuning.model_dump() if self.tuning else None,
        }

    def with_feature_options(self, overrides: Mapping[str, Mapping[str, Any]] | None) -> PipelineSpec:
        """A copy whose features take ``overrides`` over their spec's options, e.g. a run's choice from the
        trigger form: ``{"message": {"output_mode": "tf_idf"}}``.

        Empty values (an optional form field left empty) keep the spec's; the options are checked by
        their kind as in the spec file, errors name the feature and the option.
        """
        overrides = {name: {k: v for k, v in (options or {}).items() if v not in (None, "")}
                     for name, options in (overrides or {}).items()}
        overrides = {name: options for name, options in overrides.items() if options}
        if not overrides:
            return self
        unknown = sorted(set(overrides) - {f.name for f in self.features})
        if unknown:
            raise SpecError(f"feature options given for {unknown}, which are not features of {self.name!r}")
        features = tuple(
            _parse_feature(f.name, {"kind": f.kind, **f.options.model_dump(exclude_unset=True), **overrides[f.name]})
            if f.name in overrides else f
            for f in self.features
        )
        crosses = _parse_crosses([c.model_dump() for c in self.crosses], {f.name: f for f in features})
        return dataclasses.replace(self, features=features, crosses=crosses)

    def fingerprint(self) -> str:
        """A stable hash of everything the spec says, for up-to-date checks.

        The ``tuning`` block is left out: it says how to search for settings, not what any
        step computes (a trial's settings are applied to the spec itself, :meth:`with_settings`).
        """
        described = {name: value for name, value in self.to_dict().items() if name != "tuning"}
        canonical = json.dumps(described, sort_keys=True, default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def with_settings(self, settings: dict[str, Any] | None) -> PipelineSpec:
        """A copy with ``settings`` applied: ``{"training.learning_rate": 0.01, "model.kind": "mlp", ...}``.

        Names are the tunable settings (:func:`tunable_settings`); each value is cast and
        checked as the spec's own would be, and an error names the setting.
        """
        if not settings:
            return self
        spec, types = self, tunable_settings(self)
        for name, value in settings.items():
            spec = _with_setting(spec, name, value, setting_type(types, name))
        return spec


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and check a spec file; errors name the file and the field."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"Spec file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise SpecError(f"Spec file {path} is not valid YAML: {err}") from None
    try:
        return parse_spec(raw)
    except SpecError as err:
        raise SpecError(f"{path}: {err}") from None


def parse_spec(raw: Any) -> PipelineSpec:
    if not isinstance(raw, dict):
        raise SpecError("a spec must be a mapping at the top level")
    raw = dict(raw)
    # First: a misspelt field ("lable") is named as such, not reported as the required one missing.
    known = {f.name for f in dataclasses.fields(PipelineSpec)}
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"unknown top-level fields {sorted(unknown)}; known fields: {sorted(known)}")
    name = _required(raw, "name", str)
    features_raw = _required(raw, "features", dict)
    features = tuple(_parse_feature(fname, fraw) for fname, fraw in features_raw.items())
    if not features:
        raise SpecError("'features' must list at least one feature")
    crosses = _parse_crosses(raw.get("crosses") or [], {f.name: f for f in features})
    label = _parse_label(_required(raw, "label", dict))
    if label.name in features_raw:
        raise SpecError(f"label {label.name!r} is also listed as a feature")
    training = _build(TrainingSpec, raw.get("training") or {}, "training")
    training.loss_for(label.task)
    source_raw = dict(_required(raw, "source", dict))
    if isinstance(source_raw.get("column_names"), list):
        source_raw["column_names"] = tuple(str(name) for name in source_raw["column_names"])
    source = _build(SourceSpec, source_raw, "source")
    if source.kind not in SOURCE_KINDS:
        raise SpecError(f"source.kind {source.kind!r} is not one of {SOURCE_KINDS}")
    if source.kind in ("csv", "landing", "image_folder") and not source.uri:
        raise SpecError(f"source.kind {source.kind!r} needs source.uri")
    if source.splits:
        if source.kind != "tfds":
            raise SpecError(f"source.splits maps TFDS splits; source.kind {source.kind!r} has none")
        if set(source.splits) != set(SPLITS) or not all(isinstance(v, str) and v for v in source.splits.values()):
            raise SpecError(f"source.splits must name a TFDS split or slice for each of {SPLITS}, got {source.splits}")
    for wait_field in ("deadline", "poke_interval"):
        try:
            parse_duration(getattr(source, wait_field))
        except ValueError as err:
            raise SpecError(f"source.{wait_field}: {err}") from None
    _check_file_layout(source, source_raw)
    split_raw = dict(raw.get("split") or {})
    if "key" in split_raw:
        split_raw["key"] = tuple(split_raw["key"])
    if source.splits:
        split_raw.setdefault("column", SOURCE_SPLIT_COLUMN)
    split = _build(SplitSpec, split_raw, "split")
    if abs(sum(split.fractions().values()) - 1.0) > 1e-6 or min(split.fractions().values()) <= 0:
        raise SpecError(f"split fractions must be positive and sum to 1, got {split.fractions()}")
    unknown_keys = set(split.key) - {f.name for f in features} - {label.name}
    if unknown_keys:
        raise SpecError(f"split.key names unknown columns {sorted(unknown_keys)}")
    if split.column in {f.name for f in features} | {label.name}:
        raise SpecError(f"split.column {split.column!r} is a feature or the label; it must be a column of its own")
    shards = {**{s: 1 for s in SPLITS}, **(raw.get("shards") or {})}
    if set(shards) != set(SPLITS) or any(not isinstance(n, int) or n < 1 for n in shards.values()):
        raise SpecError(f"shards must give a positive integer for each of {SPLITS}, got {shards}")
    model_raw = dict(raw.get("model") or {})
    if "hidden_units" in model_raw:
        model_raw["hidden_units"] = tuple(model_raw["hidden_units"])
    known_model_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"options"}
    model_raw["options"] = {k: model_raw.pop(k) for k in list(model_raw) if k not in known_model_fields}
    na_values = tuple(str(v) for v in raw.get("na_values", PipelineSpec.na_values))
    spec = PipelineSpec(
        name=name,
        description=str(raw.get("description", "")),
        source=source,
        label=label,
        features=features,
        crosses=crosses,
        split=split,
        shards=shards,
        na_values=na_values,
        max_quarantine_fraction=float(raw.get("max_quarantine_fraction", PipelineSpec.max_quarantine_fraction)),
        model=_build(ModelSpec, model_raw, "model"),
        training=training,
        evaluation=_build(EvaluationSpec, raw.get("evaluation") or {}, "evaluation"),
        serving_name=str(raw.get("serving_name", "")),
        drift=_parse_drift(raw.get("drift") or {}, features),
        serving=_build(ServingSpec, raw.get("serving") or {}, "serving"),
        scoring=_build(ScoringSpec, {k: tuple(v) if k == "key" else v for k, v in (raw.get("scoring") or {}).items()},
                       "scoring"),
    )
    if label.name in spec.scoring.key:
        raise SpecError(f"scoring.key names the label {label.name!r}: a delivery to score has no label")
    if raw.get("tuning") is not None:
        spec = dataclasses.replace(spec, tuning=_parse_tuning(raw["tuning"], spec))
    return spec


FILE_LAYOUT_FIELDS = ("delimiter", "quoting", "header", "column_names", "encoding", "archive_member")


def _check_file_layout(source: SourceSpec, raw: dict) -> None:
    """The csv/landing options that say how a delivered file is laid out, checked."""
    given = sorted(set(FILE_LAYOUT_FIELDS) & set(raw))
    if given and source.kind not in ("csv", "landing"):
        raise SpecError(f"source.{given[0]} describes a delivered file: it applies to kind csv or landing, "
                        f"not {source.kind!r}")
    if len(source.delimiter) != 1 or source.delimiter in "\r\n\"":
        raise SpecError(f"source.delimiter must be one character, not a line break or a quote; got "
                        f"{source.delimiter!r} (a tab is \"\\t\" in YAML)")
    if source.quoting not in QUOTING:
        raise SpecError(f"source.quoting {source.quoting!r} is not one of {sorted(QUOTING)}")
    if not isinstance(source.header, bool):
        raise SpecError(f"source.header must be true or false, got {source.header!r}")
    if not source.header and not source.column_names:
        raise SpecError("source.header is false: name the file's columns, in order, in source.column_names")
    if source.header and source.column_names:
        raise SpecError("source.column_names names the columns of a file without a header: set header: false, "
                        "or leave column_names out to read them from the header")
    names = list(source.column_names)
    if any(not name for name in names) or len(set(names)) != len(names):
        raise SpecError(f"source.column_names must be distinct, non-empty names; got {names}")
    try:
        codecs.lookup(source.encoding)
    except LookupError:
        raise SpecError(f"source.encoding {source.encoding!r} is not an encoding Python knows (utf-8, latin-1, "
                        "cp1252, ...)") from None


def _parse_feature(name: str, raw: Any) -> Feature:
    try:
        return parse_feature(name, raw)
    except OptionsError as err:
        raise SpecError("; ".join(f"features.{name}{'.' + path if path else ''}: {message}"
                                  for path, message in err.errors)) from None


def _parse_drift(raw: Any, features: tuple[Feature, ...]) -> DriftSpec:
    drift = _build(DriftSpec, dict(raw) if isinstance(raw, dict) else raw, "drift")
    unknown = set(drift.features) - {f.name for f in features}
    if unknown:
        raise SpecError(f"drift.features names unknown features {sorted(unknown)}")
    return drift


def _parse_crosses(raw: Any, features: dict[str, Feature]) -> tuple[Cross, ...]:
    if not isinstance(raw, list):
        raise SpecError("crosses must be a list of {features: [...], num_bins: N}")
    crosses = []
    for i, entry in enumerate(raw):
        try:
            cross = Cross(**entry) if isinstance(entry, dict) else Cross.model_validate(entry)
            cross.check(features)
        except pydantic.ValidationError as err:
            raise SpecError("; ".join(f"crosses[{i}].{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                      for e in err.errors())) from None
        except ValueError as err:
            raise SpecError(f"crosses[{i}]: {err}") from None
        crosses.append(cross)
    names = [c.name for c in crosses]
    clashes = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(features)))
    if clashes:
        raise SpecError(f"crosses {clashes} are listed twice or share a feature's name")
    return tuple(crosses)


def _parse_label(raw: dict) -> LabelSpec:
    raw = dict(raw)
    raw["classes"] = tuple(str(c) for c in raw.get("classes", ()))
    label = _build(LabelSpec, raw, "label")
    if label.task not in TASKS:
        raise SpecError(f"label.task {label.task!r} is not one of {TASKS}")
    if label.task == "classification" and len(label.classes) < 2:
        raise SpecError("label.classes must list at least two classes for a classification task")
    if label.scaling not in LABEL_SCALINGS:
        raise SpecError(f"label.scaling {label.scaling!r} is not one of {LABEL_SCALINGS}")
    return label

# -- tuning: the search space of a hyperparameter search (tfjobs.tune) ----------------------------------

#: Training settings a search may vary. Not epochs (a trial trains ``tuning.epochs``), nor the
#: seed, shuffle buffer or XLA switch: they change what a trial costs or draws, not the model.
TUNABLE_TRAINING = ("learning_rate", "batch_size", "loss", "huber_delta", "loop", "wide_learning_rate",
                    "early_stopping_patience")
#: Feature options that only the model reads (adapt computes nothing from them), so a trial can
#: change them on the adapted state; options such as ``min_frequency`` would need another adapt.
TUNABLE_FEATURE_OPTIONS = ("embedding_dim",)
#: The eval-split metrics an objective can name, per task, and which direction is better.
OBJECTIVE_METRICS: dict[str, dict[str, str]] = {
    "regression": {"rmse": "minimize", "huber": "minimize", "loss": "minimize"},
    "classification": {"accuracy": "maximize", "loss": "minimize"},
}
SEARCH_ALGORITHMS = {
    "random": "independent random draws from the space",
    "tpe": "Tree-structured Parzen Estimator (Bayesian): draws near the settings that did well so far",
}
PRUNERS = {
    "none": "every trial trains all its epochs",
    "median": "stop a trial whose eval metric after an epoch is worse than the median of earlier trials there",
    "hyperband": "Hyperband (successive halving in brackets): stop the worse trials at growing epoch budgets",
}


class SearchRange(pydantic.BaseModel):
    """One setting's range: ``{low, high}`` (``log: true`` draws on a log scale, ``step`` on a grid),
    or ``{choices: [...]}``. Integer settings draw whole numbers."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    low: int | float | None = pydantic.Field(None, description="the smallest value to try")
    high: int | float | None = pydantic.Field(None, description="the largest value to try")
    log: bool = pydantic.Field(False, description="draw on a log scale (a positive low)")
    step: int | float | None = pydantic.Field(None, gt=0, description="draw multiples of step above low")
    choices: list[Any] | None = pydantic.Field(None, description="the values to choose from")

    @pydantic.field_validator("choices")
    @classmethod
    def _not_empty(cls, choices):
        if choices is not None and not choices:
            raise ValueError("must list at least one value")
        return choices

    @pydantic.model_validator(mode="after")
    def _range_or_choices(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None or self.step is not None or self.log:
                raise ValueError("give either low and high, or choices, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high, or choices")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above its high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs a positive low, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step do not go together")
        return self

    def values_to_check(self) -> list[Any]:
        """The values that bound what a trial may get: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


class Objective(pydantic.BaseModel):
    """What a search optimizes: an eval-split metric of the training history, and its direction."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    metric: str = pydantic.Field("loss", description="an eval-split metric: rmse, huber, accuracy or loss")
    direction: Literal["minimize", "maximize"] | None = pydantic.Field(
        None, description="empty: the metric's own (minimize an error, maximize accuracy)")


class TuningSpec(pydantic.BaseModel):
    """A hyperparameter search: which settings vary over which ranges, the objective, and the budget.

    Setting names are the spec's own paths: ``training.learning_rate``, ``model.kind``,
    ``model.hidden_units``, ``model.<option>``, ``features.<name>.embedding_dim``.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    space: dict[str, SearchRange] = pydantic.Field(
        min_length=1, description="setting name -> range or choices, e.g. training.learning_rate: {low: 1e-4, "
        "high: 1e-2, log: true}")
    objective: Objective = pydantic.Field(Objective(), description="the eval-split metric to optimize")
    trials: int = pydantic.Field(20, ge=1, le=10_000, description="trials in the study, all runners together")
    parallel: int = pydantic.Field(2, ge=1, le=256, description="trial runners at once (mapped tasks)")
    algorithm: Literal["random", "tpe"] = pydantic.Field("tpe", description="how the next trial's settings are drawn")
    pruner: Literal["none", "median", "hyperband"] = pydantic.Field(
        "none", description="early stopping of bad trials after each epoch")
    epochs: int = pydantic.Field(2, ge=1, le=10_000, description="epochs one trial trains (the cheap budget)")
    seed: int | None = pydantic.Field(None, description="the sampler's seed; empty: training.seed")

    def direction(self, task: str) -> str:
        return self.objective.direction or OBJECTIVE_METRICS[task][self.objective.metric]

    def check(self, spec: PipelineSpec) -> None:
        """Every setting exists and every value its range allows fits the spec; the objective fits the task."""
        types = tunable_settings(spec)
        for name, search in self.space.items():
            where = f"space.{name}"
            kind = setting_type(types, name, where)
            if search.choices is None and kind not in ("int", "float"):
                raise SpecError(f"tuning.{where}: {name} is a {kind} setting: give choices, not low and high")
            if search.choices is None and kind == "int" and not all(
                    isinstance(v, int) for v in (search.low, search.high, search.step or 1)):
                raise SpecError(f"tuning.{where}: {name} takes whole numbers; low, high and step must be integers")
            for value in search.values_to_check():
                try:
                    _with_setting(spec, name, value, kind)
                except SpecError as err:
                    raise SpecError(f"tuning.{where}: {err}") from None
        metrics = OBJECTIVE_METRICS[spec.label.task]
        if self.objective.metric not in metrics:
            raise SpecError(f"tuning.objective.metric {self.objective.metric!r} is not an eval metric of a "
                            f"{spec.label.task} task; choose one of {sorted(metrics)}")
        if self.objective.metric == "loss" and "training.loss" in self.space:
            raise SpecError("tuning.objective.metric 'loss' compares different losses when training.loss is searched: "
                            f"optimize one of {sorted(set(metrics) - {'loss'})}")


def tunable_settings(spec: PipelineSpec) -> dict[str, str]:
    """Every setting a search (or a fixed override) may set, with its type: int, float, str or units."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainingSpec)}
    settings = {f"training.{name}": types[name] for name in TUNABLE_TRAINING}
    settings.update({"model.kind": "str", "model.hidden_units": "units", "model.dropout": "float"})
    settings.update({f"model.{name}": kind for name, kind in choices.MODEL_OPTIONS.items()})
    for feature in spec.features:
        declared = feature.to_dict()
        for option in TUNABLE_FEATURE_OPTIONS:
            info = type(feature.options).model_fields.get(option)
            # Only where the feature uses the option as declared (an embedding's width, not a one-hot's).
            if info is not None and _parses(feature.name, {**declared, option: declared[option]}):
                settings[f"features.{feature.name}.{option}"] = getattr(info.annotation, "__name__", "str")
    return settings


def _parses(name: str, raw: dict) -> bool:
    try:
        _parse_feature(name, raw)
    except SpecError:
        return False
    return True


def setting_type(types: dict[str, str], name: str, where: str = "") -> str:
    """The type of a setting among ``types`` (:func:`tunable_settings`); an unknown name is an error listing them."""
    if name not in types:
        raise SpecError(f"tuning.{where or name}: unknown setting {name!r}; known settings: {sorted(types)}")
    return types[name]


def _with_setting(spec: PipelineSpec, name: str, value: Any, kind: str) -> PipelineSpec:
    section, _, key = name.partition(".")
    try:
        if kind == "int" and (isinstance(value, bool) or float(value) != int(float(value))):
            raise ValueError
        value = {"int": lambda v: int(float(v)), "float": float, "str": str, "units": _units}[kind](value)
    except (TypeError, ValueError):
        raise SpecError(f"{name} must be {'a list of positive integers' if kind == 'units' else kind}, "
                        f"got {value!r}") from None
    # Rates, sizes and counts are positive; a model's dropout, noise or penalty may be zero.
    if kind in ("int", "float") and not (value >= 0 if section == "model" else value > 0):
        raise SpecError(f"{name} must be {'at least 0' if section == 'model' else 'positive'}, got {value!r}")
    if section == "training":
        training = spec.training.with_overrides({key: value})
        training.loss_for(spec.label.task)
        return dataclasses.replace(spec, training=training)
    if section == "model":
        if key == "kind" and value not in choices.MODEL_KINDS:
            raise SpecError(f"model.kind {value!r} is not one of {sorted(choices.MODEL_KINDS)}")
        if key == "dropout" and not value < 1:
            raise SpecError(f"model.dropout must be below 1, got {value!r}")
        if key in ("kind", "hidden_units", "dropout"):
            return dataclasses.replace(spec, model=dataclasses.replace(spec.model, **{key: value}))
        return dataclasses.replace(spec, model=dataclasses.replace(spec.model, options={**spec.model.options,
                                                                                         key: value}))
    feature_name, _, option = key.partition(".")
    feature = _parse_feature(feature_name, {**spec.feature(feature_name).to_dict(), option: value})
    return dataclasses.replace(spec, features=tuple(feature if f.name == feature_name else f for f in spec.features))


def _units(value: Any) -> tuple[int, ...]:
    units = tuple(int(u) for u in value)
    if not units or min(units) < 1 or any(isinstance(u, bool) or int(u) != u for u in value):
        raise ValueError
    return units


def tuned_state(state: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """An adapted ``state.json`` with the feature options among ``settings`` applied (what a trial trains with)."""
    state = json.loads(json.dumps(state))
    for name, value in settings.items():
        section, _, rest = name.partition(".")
        if section == "features":
            feature, _, option = rest.partition(".")
            state["features"][feature].setdefault("options", {})[option] = value
    return state


def _parse_tuning(raw: Any, spec: PipelineSpec) -> TuningSpec:
    try:
        tuning = TuningSpec.model_validate(raw)
    except pydantic.ValidationError as err:
        raise SpecError("; ".join(
            f"tuning.{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            if e["loc"] else f"tuning: {e['msg'].removeprefix('Value error, ')}" for e in err.errors())) from None
    tuning.check(spec)
    return tuning


def json_schema() -> dict[str, Any]:
    """A JSON Schema of a spec file (top level and every kind's feature options), for editors."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Shardline pipeline spec",
        "type": "object",
        "required": ["name", "source", "label", "features"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "source": {"type": "object", "required": ["kind"], "properties": {
                "kind": {"enum": list(SOURCE_KINDS)},
                "delimiter": {"type": "string", "minLength": 1, "maxLength": 1,
                              "description": "csv, landing: the field delimiter (\"\\t\" for tab-separated)"},
                "quoting": {"enum": sorted(QUOTING), "description": "csv, landing: minimal, fields in double quotes "
                            "(RFC 4180); none, a quote is a character like any other"},
                "header": {"type": "boolean", "description": "csv, landing: the first line names the columns"},
                "column_names": {"type": "array", "items": {"type": "string"},
                                 "description": "csv, landing: the columns of a file without a header, in order"},
                "encoding": {"type": "string", "description": "csv, landing: the text encoding (utf-8)"},
                "archive_member": {"type": "string", "description": "csv, landing: the file to read when the file "
                                   "fetched is a zip archive"},
            }},
            "label": {"type": "object", "properties": {"task": {"enum": list(TASKS)}}, "required": ["name", "task"]},
            "features": {"type": "object", "minProperties": 1, "additionalProperties": options_schema()},
            "crosses": {"type": "array", "items": Cross.model_json_schema()},
            "tuning": TuningSpec.model_json_schema(),
        },
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tfjobs.spec", description="Check a spec, or print the JSON Schema")
    parser.add_argument("spec", nargs="?", help="a spec YAML to check")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of spec files")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(json_schema(), indent=2, sort_keys=True))
    elif args.spec:
        spec = load_spec(args.spec)
        print(f"{args.spec}: {spec.name}, {len(spec.features)} features, {len(spec.crosses)} crosses; fine")
    else:
        parser.error("give a spec to check, or --schema")


def _required(raw: dict, key: str, kind: type) -> Any:
    if key not in raw:
        raise SpecError(f"missing required field {key!r}")
    if not isinstance(raw[key], kind):
        raise SpecError(f"field {key!r} must be a {kind.__name__}, got {type(raw[key]).__name__}")
    return raw[key]


def _build(cls: type, raw: dict, where: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"{where} has unknown fields {sorted(unknown)}; known fields: {sorted(known)}")
    try:
        return cls(**raw)
    except TypeError as err:
        raise SpecError(f"{where}: {err}") from None


if __name__ == "__main__":
    main()
