"""MNIST through TensorFlow Datasets: the PNG files TFDS stores, straight through to a CNN served from encoded bytes.

fetch -> validate -> shard -> adapt -> train -> evaluate -> export. The fetch reads
TFDS's ``train[:90%]``, ``train[90%:]`` and ``test`` as Shardline's train, eval and
test splits (the spec's ``source.splits``) into Parquet, without decoding an image;
its first run downloads MNIST into TFDS's data directory.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.base import read_spec
from operators.params import training_params
from operators.pipeline import training_pipeline

SPEC = Path(__file__).parents[1] / "include" / "mnist.yaml"

with DAG(
    dag_id="mnist",
    description="MNIST from TensorFlow Datasets to a TF Serving CNN (encoded image in)",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=training_params(read_spec(SPEC)),
    default_args={"spec": SPEC, "retries": 1},
    tags=["shardline", "classification", "images"],
    doc_md=__doc__,
):
    training_pipeline()
