"""Airflow Params for the trigger form, from a pipeline spec's training defaults."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from airflow.sdk import Param

from operators.train import DEFAULT_EPOCH_TIMEOUT
from tfjobs import choices
from tfjobs.deadlines import DURATION_PATTERN, UTC_TIME_PATTERN
from tfjobs.spec import PipelineSpec

#: Params that override the spec's training settings, passed to TrainModelOperator.
HYPERPARAMETER_NAMES = ("epochs", "batch_size", "learning_rate", "early_stopping_patience", "loss", "loop")
HYPERPARAMETERS = {name: "{{ params.%s }}" % name for name in HYPERPARAMETER_NAMES}

# A URI with user information (scheme://user:password@host) would keep its password in the run's conf.
URI_WITHOUT_CREDENTIALS = r"^(?![A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@)"


#: What a DAG lets a run choose of its features' options: ``{"message": ["output_mode", "storage"]}``.
FeatureChoices = Mapping[str, Sequence[str]]
#: The JSON Schema keywords of a kind's option that a form field takes over.
_FORM_KEYWORDS = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def feature_option_param_name(feature: str, option: str) -> str:
    return f"{feature}_{option}"


def feature_option_params(spec: PipelineSpec, choices: FeatureChoices) -> dict[str, Param]:
    """One form field per chosen feature option, ``<feature>_<option>``: typed, with its choices and
    description from the feature's kind (its options' JSON Schema), the spec's value as the default."""
    params = {}
    for name, options in choices.items():
        feature = spec.feature(name)
        properties = feature.Options.model_json_schema()["properties"]
        for option in options:
            if option not in properties:
                raise ValueError(f"Feature {name!r} ({feature.kind}) has no option {option!r}; its options are "
                                 f"{sorted(properties)}")
            schema = properties[option]
            params[feature_option_param_name(name, option)] = Param(
                getattr(feature.options, option), **{k: schema[k] for k in _FORM_KEYWORDS if k in schema},
                title=f"{name}: {option.replace('_', ' ')}",
                description=f"{schema.get('description', option)} (the spec's {name}.{option} for this run).",
            )
    return params


def feature_option_templates(choices: FeatureChoices) -> dict[str, dict[str, str]]:
    """What every step of a run gets as ``feature_options``: each chosen option from its form field."""
    return {name: {option: "{{ params.%s }}" % feature_option_param_name(name, option) for option in options}
            for name, options in choices.items()}


def training_params(spec: PipelineSpec, feature_choices: FeatureChoices | None = None) -> dict[str, Param]:
    """The trigger form: typed, ranged and described, with the spec's values as defaults; with
    ``feature_choices``, a field for each feature option a run may choose (:func:`feature_option_params`)."""
    training = spec.training
    return {
        "epochs": Param(
            training.epochs, type="integer", minimum=1, maximum=10_000,
            title="Epochs", description="Most passes over the training split (early stopping may end sooner).",
        ),
        "batch_size": Param(
            training.batch_size, type="integer", minimum=1, maximum=1_048_576,
            title="Batch size", description="Examples per training step.",
        ),
        "learning_rate": Param(
            training.learning_rate, type="number", exclusiveMinimum=0, maximum=10,
            title="Learning rate", description="Adam's learning rate.",
        ),
        "early_stopping_patience": Param(
            training.early_stopping_patience, type="integer", minimum=1, maximum=1000,
            title="Early stopping patience",
            description="Epochs without a better validation loss before training stops.",
        ),
        "model": Param(
            spec.model.kind, type="string", enum=sorted(choices.MODEL_KINDS),
            values_display=dict(choices.MODEL_KINDS),
            title="Model", description="Which model architecture to train.",
        ),
        "loss": Param(
            training.loss_for(spec.label.task), type="string", enum=list(choices.TASK_LOSSES[spec.label.task]),
            values_display={name: choices.LOSSES[name] for name in choices.TASK_LOSSES[spec.label.task]},
            title="Loss", description="What training minimizes.",
        ),
        "loop": Param(
            training.loop, type="string", enum=sorted(choices.TRAINING_LOOPS),
            values_display=dict(choices.TRAINING_LOOPS),
            title="Training loop", description="Keras fit() or Shardline's custom GradientTape loop.",
        ),
        "epoch_timeout": Param(
            DEFAULT_EPOCH_TIMEOUT, type="string", pattern=f"^{DURATION_PATTERN}$", title="Epoch time limit",
            description="The most one epoch may take (90s, 10m, 1h): training is stopped after 30 minutes plus "
            "the epochs times this, so that a run of many epochs cannot hold the GPU queue indefinitely.",
        ),
        # "null" too: the UI form requires every field whose type cannot be null, so "" would block Trigger.
        "source_uri": source_param(spec),
        "source_conn_id": Param(
            "", type=["null", "string"], title="Source connection",
            description="The id of an Airflow HTTP connection whose login and password authenticate to an "
            "http(s) Source CSV (Basic auth). Its host must be the source's: credentials go nowhere else.",
        ),
        "delivery_deadline": Param(
            "", type=["null", "string"], pattern=f"^$|^{DURATION_PATTERN}$|^{UTC_TIME_PATTERN}$",
            title="Delivery deadline",
            description="How long after the end of the run's day (UTC) its delivery may come (6h, 90m), or until "
            "when (2026-11-26T06:00:00Z). The fetch looks for a missing delivery until then, without holding a "
            "worker, and then fails. Empty for the spec's source.deadline (6h unless the spec says otherwise).",
        ),
        "delivery_poke_interval": Param(
            "", type=["null", "string"], pattern=f"^$|^{DURATION_PATTERN}$", title="Delivery poke interval",
            description="How often to look for a delivery that is not there yet (30s, 5m). Empty for the spec's "
            "source.poke_interval (5m unless the spec says otherwise).",
        ),
        "force_retrain": Param(
            False, type="boolean", title="Retrain",
            description="Retrain even when a model of the same data and settings exists for this run.",
        ),
        **lifecycle_params(),
        **feature_option_params(spec, feature_choices or {}),
    }


def lifecycle_params() -> dict[str, Param]:
    """The promotion Param: force a model that is worse than production's (beyond the change thresholds) in."""
    return {
        "force_promotion": Param(
            False, type="boolean", title="Force promotion",
            description="Promote this run's model even if it is worse than the model in production beyond the "
            "spec's evaluation.change thresholds (it must still clear the absolute bounds). Recorded as forced, "
            "with who triggered the run and when.",
        ),
    }


ALLOWED_SOURCES_NOTE = "Only the store, the spec's own source and [shardline] allowed_source_prefixes may be fetched."


def source_param(spec: PipelineSpec) -> Param:
    """What a run may fetch instead of the spec's source: a CSV, or another image folder."""
    if spec.source.kind == "image_folder":
        return Param(
            "", type=["null", "string"], pattern=URI_WITHOUT_CREDENTIALS, title="Source folder",
            description="Fetch this image folder (a path or an s3:// prefix, one sub-folder of images per class) "
            "instead of the spec's; empty for the spec's. " f"{ALLOWED_SOURCES_NOTE}",
        )
    return Param(
        "", type=["null", "string"], pattern=URI_WITHOUT_CREDENTIALS, title="Source CSV",
        description="Fetch this CSV (path, file://, http(s)://, s3://) instead of the spec's source; "
        "empty for the spec's. {partition} in it becomes the run's date, to read one delivery per day "
        "from a landing prefix: s3://landing/housing/{partition}.csv; the fetch waits for a late delivery "
        "until its deadline. No user:password@ in it: name an HTTP connection in Source connection. "
        f"{ALLOWED_SOURCES_NOTE}",
    )
