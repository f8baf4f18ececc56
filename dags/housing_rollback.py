"""California housing: point production back at an earlier version (manual trigger).

Rewrites ``serving/housing/production.json`` and TF Serving's ``models.config``; no model file
moves. Leave *Version* empty for the version that was production before the current one.
The same as ``python -m tfjobs.rollback --serving <store>/serving/housing [--to VERSION]``.
"""

from pathlib import Path

import pendulum
from airflow.sdk import DAG

from operators.promote import RollbackModelOperator, rollback_params

SPEC = Path(__file__).parents[1] / "include" / "housing.yaml"

with DAG(
    dag_id="housing_rollback",
    description="California housing: roll production back to an earlier serving version",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=rollback_params(),
    default_args={"spec": SPEC},
    tags=["shardline", "lifecycle"],
    doc_md=__doc__,
):
    RollbackModelOperator(task_id="rollback", version="{{ params.version or '' }}", reason="{{ params.reason or '' }}")
