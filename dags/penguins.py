"""Palmer penguins, daily: fetch -> validate -> shard -> adapt -> train -> evaluate -> export.

Trigger it from the UI to change the training Params; each run partitions its data
by the logical date and publishes a new serving version when the model is blessed.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.base import read_spec
from operators.params import training_params
from operators.pipeline import training_pipeline

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
    training_pipeline()
