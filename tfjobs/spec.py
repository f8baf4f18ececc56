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

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from tfjobs import choices
from tfjobs.deadlines import parse_duration
from tfjobs.features import Cross, Feature, OptionsError, options_schema, parse_feature
from tfjobs.storage.examples import Column

TASKS = ("classification", "regression")
LABEL_SCALINGS = ("none", "standardize")
SOURCE_KINDS = ("palmerpenguins", "sklearn", "tfds", "csv", "landing")
SPLITS = ("train", "eval", "test")


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
    uri: str = ""  # csv: a path, file://, http(s):// or s3:// URI; landing: a prefix
    name: str = ""  # sklearn/tfds: the dataset's name
    split: str = "train"  # tfds: which split to take
    pattern: str = "{partition}.csv"  # landing: the file name of one day's delivery
    # Landing (or a source_uri with {partition}): how long after the end of its day a partition's
    # delivery may come, and how often to look for it meanwhile (tfjobs.deadlines.parse_duration).
    deadline: str = "6h"
    poke_interval: str = "5m"


@dataclass(frozen=True)
class SplitSpec:
    train: float = 0.8
    eval: float = 0.1
    test: float = 0.1
    # Columns whose values decide a row's split; empty means the whole row, so that
    # duplicate rows always land in the same split.
    key: tuple[str, ...] = ()

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

    def __post_init__(self):
        object.__setattr__(self, "jit_compile", str(self.jit_compile).lower())
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
            caster = {"int": int, "float": float, "str": str}[types[key]]
            try:
                changes[key] = caster(value)
            except (TypeError, ValueError):
                raise SpecError(f"Training setting {key!r} must be {types[key]}, got {value!r}") from None
        return dataclasses.replace(self, **changes)


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

    @property
    def model_name(self) -> str:
        return self.serving_name or self.name

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the pipeline reads: the features, then the label."""
        return tuple(f.name for f in self.features) + (self.label.name,)

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
        }

    def fingerprint(self) -> str:
        """A stable hash of everything the spec says, for up-to-date checks."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()


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
    source = _build(SourceSpec, _required(raw, "source", dict), "source")
    if source.kind not in SOURCE_KINDS:
        raise SpecError(f"source.kind {source.kind!r} is not one of {SOURCE_KINDS}")
    if source.kind in ("csv", "landing") and not source.uri:
        raise SpecError(f"source.kind {source.kind!r} needs source.uri")
    for wait_field in ("deadline", "poke_interval"):
        try:
            parse_duration(getattr(source, wait_field))
        except ValueError as err:
            raise SpecError(f"source.{wait_field}: {err}") from None
    split_raw = dict(raw.get("split") or {})
    if "key" in split_raw:
        split_raw["key"] = tuple(split_raw["key"])
    split = _build(SplitSpec, split_raw, "split")
    if abs(sum(split.fractions().values()) - 1.0) > 1e-6 or min(split.fractions().values()) <= 0:
        raise SpecError(f"split fractions must be positive and sum to 1, got {split.fractions()}")
    unknown_keys = set(split.key) - {f.name for f in features} - {label.name}
    if unknown_keys:
        raise SpecError(f"split.key names unknown columns {sorted(unknown_keys)}")
    shards = {**{s: 1 for s in SPLITS}, **(raw.get("shards") or {})}
    if set(shards) != set(SPLITS) or any(not isinstance(n, int) or n < 1 for n in shards.values()):
        raise SpecError(f"shards must give a positive integer for each of {SPLITS}, got {shards}")
    model_raw = dict(raw.get("model") or {})
    if "hidden_units" in model_raw:
        model_raw["hidden_units"] = tuple(model_raw["hidden_units"])
    known_model_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"options"}
    model_raw["options"] = {k: model_raw.pop(k) for k in list(model_raw) if k not in known_model_fields}
    na_values = tuple(str(v) for v in raw.get("na_values", PipelineSpec.na_values))
    return PipelineSpec(
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
    )


def _parse_feature(name: str, raw: Any) -> Feature:
    try:
        return parse_feature(name, raw)
    except OptionsError as err:
        raise SpecError("; ".join(f"features.{name}{'.' + path if path else ''}: {message}"
                                  for path, message in err.errors)) from None


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
            "source": {"type": "object", "properties": {"kind": {"enum": list(SOURCE_KINDS)}}, "required": ["kind"]},
            "label": {"type": "object", "properties": {"task": {"enum": list(TASKS)}}, "required": ["name", "task"]},
            "features": {"type": "object", "minProperties": 1, "additionalProperties": options_schema()},
            "crosses": {"type": "array", "items": Cross.model_json_schema()},
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
