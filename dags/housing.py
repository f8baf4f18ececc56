"""California housing, daily: fetch -> validate -> shard -> adapt -> train -> evaluate -> export.

A regression on numeric features with missing values and one rare-valued
category. Trigger it from the UI to pick the model (functional MLP or a
subclassed residual, wide & deep or reconstructing model), the loss (MSE or
Huber) and the training loop (``fit()`` or the custom GradientTape loop that
trains a wide & deep model's two parts with two optimizers). Each run fetches
the partition of its logical date: the spec's CSV, another CSV (``source_uri``),
or that day's delivery under a landing prefix (``source_uri`` with ``{partition}``),
waited for until its deadline (``delivery_deadline``; 6 hours after the day ends).

With the ``tuning`` Param on (off for the daily run), a hyperparameter search runs between
adapt and train: trial runners, one mapped task each on the GPU queue, share one Optuna study
over the spec's ``tuning:`` space, and train uses the best trial's settings. A training Param
left empty takes the spec's or the tuned value; one set in the form wins over both.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.base import read_spec
from operators.pipeline import training_pipeline
from operators.tune import tuning_params

SPEC = Path(__file__).parents[1] / "include" / "housing.yaml"

with DAG(
    dag_id="housing",
    description="California housing prices, from a daily CSV delivery to a TF Serving model (dollars in, dollars out)",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=tuning_params(read_spec(SPEC)),
    default_args={"spec": SPEC, "retries": 1},
    tags=["shardline", "regression"],
    doc_md=__doc__,
):
    training_pipeline(tuning=True)
