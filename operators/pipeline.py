"""The training pipeline every Shardline DAG runs, wired to the trigger form's Params."""

from __future__ import annotations

from airflow.sdk import BaseOperator, chain

from operators.adapt import AdaptPreprocessingOperator
from operators.evaluate import EvaluateModelOperator
from operators.export import ExportServingModelOperator
from operators.fetch import FetchDatasetOperator
from operators.params import HYPERPARAMETERS
from operators.shard import ShardToTFRecordOperator
from operators.train import TrainModelOperator
from operators.tune import OPTIONAL_HYPERPARAMETERS, OPTIONAL_MODEL_KIND, tuning_steps
from operators.validate import ValidateDatasetOperator


def training_pipeline(tuning: bool = False) -> list[BaseOperator]:
    """fetch -> validate -> shard -> adapt -> train -> evaluate -> export, chained.

    Call it inside a DAG whose ``default_args`` name the spec (``{"spec": path}``)
    and whose ``params`` come from :func:`operators.params.training_params`.

    ``tuning=True`` puts the search between adapt and train (``tune_plan``, the mapped
    ``tune`` runners, ``tune_best``; :mod:`operators.tune`), switched per run by the
    ``tuning`` Param: the DAG's ``params`` then come from :func:`operators.tune.tuning_params`.
    """
    tasks = [
        # `or ''`: the form sends null for an empty optional field.
        FetchDatasetOperator(
            task_id="fetch",
            source_uri="{{ params.source_uri or '' }}",
            source_conn_id="{{ params.source_conn_id or '' }}",
            deadline="{{ params.delivery_deadline or '' }}",
            poke_interval="{{ params.delivery_poke_interval or '' }}",
        ),
        ValidateDatasetOperator(task_id="validate"),
        ShardToTFRecordOperator(task_id="shard"),
        AdaptPreprocessingOperator(task_id="adapt"),
        *(tuning_steps() if tuning else ()),
        # In a DAG that can tune, train takes the best trial's settings, under the Params the run sets.
        TrainModelOperator(
            task_id="train",
            hyperparameters=OPTIONAL_HYPERPARAMETERS if tuning else HYPERPARAMETERS,
            model_kind=OPTIONAL_MODEL_KIND if tuning else "{{ params.model }}",
            force="{{ params.force_retrain }}",
            epoch_timeout="{{ params.epoch_timeout }}",
            tuned_by="tune_best" if tuning else None,
        ),
        EvaluateModelOperator(task_id="evaluate"),
        ExportServingModelOperator(task_id="export"),
    ]
    chain(*tasks)
    return tasks
