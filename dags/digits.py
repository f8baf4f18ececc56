"""Handwritten digits: an image folder (one sub-folder per digit) to a CNN served from encoded PNG bytes.

fetch -> validate -> shard -> adapt -> train -> evaluate -> export, as every Shardline
DAG: the fetch streams the folder (a local directory or an ``s3://`` prefix, the spec's
or the *Source* Param's) into Parquet, validate decodes every image once and
quarantines the files that are not images, and the exported model takes the encoded
file (TF Serving REST: ``{"image": {"b64": "..."}}``) and decodes, resizes and
rescales it itself. The trigger form's *Model* picks what sits on top of the CNN.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.base import read_spec
from operators.params import training_params
from operators.pipeline import training_pipeline

SPEC = Path(__file__).parents[1] / "include" / "digits.yaml"

with DAG(
    dag_id="digits",
    description="Handwritten digits, from a folder of PNG files per class to a TF Serving CNN (encoded image in)",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=training_params(read_spec(SPEC)),
    default_args={"spec": SPEC, "retries": 1},
    tags=["shardline", "classification", "images"],
    doc_md=__doc__,
):
    training_pipeline()
