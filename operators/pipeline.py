"""The training pipeline every Shardline DAG runs, wired to the trigger form's Params."""

from __future__ import annotations

from airflow.sdk import BaseOperator, chain

from operators.adapt import AdaptPreprocessingOperator
from operators.evaluate import EvaluateModelOperator
from operators.export import ExportServingModelOperator
from operators.fetch import FetchDatasetOperator
from operators.params import HYPERPARAMETERS, FeatureChoices, feature_option_templates
from operators.shard import ShardToTFRecordOperator
from operators.train import TrainModelOperator
from operators.validate import ValidateDatasetOperator


def training_pipeline(feature_choices: FeatureChoices | None = None) -> list[BaseOperator]:
    """fetch -> validate -> shard -> adapt -> train -> evaluate -> export, chained.

    Call it inside a DAG whose ``default_args`` name the spec (``{"spec": path}``)
    and whose ``params`` come from :func:`operators.params.training_params`, with the same
    ``feature_choices``: every step then reads the spec with the run's choices of those options.
    """
    options = {"feature_options": feature_option_templates(feature_choices)} if feature_choices else {}
    tasks = [
        # `or ''`: the form sends null for an empty optional field.
        FetchDatasetOperator(
            task_id="fetch",
            source_uri="{{ params.source_uri or '' }}",
            source_conn_id="{{ params.source_conn_id or '' }}",
            deadline="{{ params.delivery_deadline or '' }}",
            poke_interval="{{ params.delivery_poke_interval or '' }}",
            **options,
        ),
        ValidateDatasetOperator(task_id="validate", **options),
        ShardToTFRecordOperator(task_id="shard", **options),
        AdaptPreprocessingOperator(task_id="adapt", **options),
        TrainModelOperator(
            task_id="train",
            hyperparameters=HYPERPARAMETERS,
            model_kind="{{ params.model }}",
            force="{{ params.force_retrain }}",
            epoch_timeout="{{ params.epoch_timeout }}",
            **options,
        ),
        EvaluateModelOperator(task_id="evaluate", **options),
        ExportServingModelOperator(task_id="export", **options),
    ]
    chain(*tasks)
    return tasks
