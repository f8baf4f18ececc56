"""Palmer penguins, batch scoring: fetch -> validate -> statistics -> score, with the production model.

Each day's delivery of rows without the label lands under a prefix (by default
``<store>/landing/penguins/<date>.csv``); the run validates it with the training spec (the label
not required: bad rows go to the quarantine with their reason), checks it for drift against
the data the production model was trained on, and writes the species of each penguin to
``predictions/penguins/<date>/predictions.parquet``, with each row's CSV line and the model version.
Scheduled daily, and whenever the production model changes (a promotion or a rollback).
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.scoring import scoring_params, scoring_pipeline, scoring_schedule

SPEC = Path(__file__).parents[1] / "include" / "penguins.yaml"

with DAG(
    dag_id="penguins_scoring",
    description="Palmer penguins: score each day's delivery with the model in production",
    schedule=scoring_schedule(SPEC),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=scoring_params(SPEC),
    default_args={"spec": SPEC, "retries": 1},
    tags=["shardline", "scoring"],
    doc_md=__doc__,
):
    scoring_pipeline(SPEC)
