"""SMS spam filter, weekly: the training pipeline (fetch -> ... -> export -> promote, and the run report).

The UCI SMS Spam Collection as delivered: a tab-separated file without a header, 5,574
messages typed by people (quotes, ``£``, 900-character lines), 13.4 % spam. The message
is a text feature; the exported model takes the raw message and tokenizes it itself.
The trigger form picks, per run, the text family (``message_output_mode``: ``int``,
token ids into an embedding, or ``tf_idf``, a bag of words) and how the message is
stored in the shards (``message_storage``: one string in an Example, or a document of
sentences of tokens in a SequenceExample), besides the training Params. A model is
exported only with test accuracy >= 0.95 and spam recall >= 0.85.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.base import read_spec
from operators.params import training_params
from operators.pipeline import training_pipeline

SPEC = Path(__file__).parents[1] / "include" / "sms_spam.yaml"
#: The message's options a run may choose from the trigger form.
CHOICES = {"message": ["output_mode", "storage"]}

with DAG(
    dag_id="sms_spam",
    description="SMS spam filter: from the UCI collection (tab-separated, no header) to a TF Serving model "
    "that takes the raw message",
    schedule="@weekly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=training_params(read_spec(SPEC), CHOICES),
    default_args={"spec": SPEC, "retries": 1},
    tags=["shardline", "classification", "spam"],
    doc_md=__doc__,
):
    training_pipeline(feature_choices=CHOICES)
