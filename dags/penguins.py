"""Palmer penguins, daily: fetch -> validate -> shard -> adapt -> train -> evaluate -> export.

Trigger it from the UI to change the training Params; each run partitions its data
by the logical date and publishes a new serving version when the model is blessed.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG, chain

from operators import (
    AdaptPreprocessingOperator,
    EvaluateModelOperator,
    ExportServingModelOperator,
    FetchDatasetOperator,
    ShardToTFRecordOperator,
    TrainModelOperator,
    ValidateDatasetOperator,
)
from operators.base import read_spec
from operators.params import HYPERPARAMETERS, training_params

SPEC = Path(__file__).parents[1] / "include" / "penguins.yaml"

with DAG(
    dag_id="penguins",
    description="Palmer penguins species classifier, from PyPI data to a TF Serving model",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=training_params(read_spec(SPEC)),
    default_args={"spec": SPEC, "retries": 1},
    tags=["shardline", "classification"],
    doc_md=__doc__,
):
    chain(
        FetchDatasetOperator(task_id="fetch", source_uri="{{ params.source_uri or '' }}"),
        ValidateDatasetOperator(task_id="validate"),
        ShardToTFRecordOperator(task_id="shard"),
        AdaptPreprocessingOperator(task_id="adapt"),
        TrainModelOperator(
            task_id="train",
            hyperparameters=HYPERPARAMETERS,
            model_kind="{{ params.model }}",
            force="{{ params.force_retrain }}",
        ),
        EvaluateModelOperator(task_id="evaluate"),
        ExportServingModelOperator(task_id="export"),
    )
