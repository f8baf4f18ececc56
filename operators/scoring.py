"""The batch scoring pipeline: the training DAG's operators, plus scoring, on a delivery without labels.

fetch -> validate (label not required) -> statistics (drift against the production model's
training data) -> score, and the run report as a teardown. The delivery's data steps keep
it apart from the training data: the dataset's name on the store is ``<name>_scoring``
(``raw/penguins_scoring/<partition>/``, ...); the predictions go to
``predictions/<name>/<partition>/``.
"""

from __future__ import annotations

import os

from airflow.sdk import AssetOrTimeSchedule, BaseOperator, CronTriggerTimetable, Param, chain

from operators.base import production_asset, read_spec
from operators.fetch import FetchDatasetOperator
from operators.params import URI_WITHOUT_CREDENTIALS, training_params
from operators.pipeline import with_run_report
from operators.score import ScoreDeliveryOperator
from operators.statistics import ComputeStatisticsOperator
from operators.validate import ValidateDatasetOperator

#: The Params of the training form that a scoring run takes too: where the delivery is, and how long to wait.
DELIVERY_PARAMS = ("source_conn_id", "delivery_deadline", "delivery_poke_interval")


def scoring_dataset(spec_path: str | os.PathLike) -> str:
    return f"{read_spec(spec_path).name}_scoring"


def default_landing(spec_path: str | os.PathLike) -> str:
    """``{store}/landing/<name>/{partition}.csv``: where deliveries to score land by default."""
    return f"{{store}}/landing/{read_spec(spec_path).name}/{{partition}}.csv"


def scoring_params(spec_path: str | os.PathLike) -> dict[str, Param]:
    training = training_params(read_spec(spec_path))
    return {
        "source_uri": Param(
            default_landing(spec_path), type="string", minLength=1, pattern=URI_WITHOUT_CREDENTIALS,
            title="Delivery to score",
            description="The CSV of rows to score, without the label: a path, file://, http(s):// or s3:// URI; "
            "{partition} in it becomes the run's date, {store} the store's root. "
            "The fetch waits for a late delivery until its deadline.",
        ),
        **{name: training[name] for name in DELIVERY_PARAMS},
    }


def scoring_schedule(spec_path: str | os.PathLike, cron: str = "@daily"):
    """Daily, and whenever the model's production pointer moves (a promotion or a rollback re-scores)."""
    asset = production_asset(spec_path)
    timetable = CronTriggerTimetable(cron, timezone="UTC")
    return AssetOrTimeSchedule(timetable=timetable, assets=asset) if asset else timetable


def scoring_pipeline(spec_path: str | os.PathLike) -> list[BaseOperator]:
    """fetch -> validate -> statistics -> score, chained, and the run report as a teardown.

    Call it inside a DAG whose ``default_args`` name the spec and whose ``params`` come from
    :func:`scoring_params`.
    """
    dataset = scoring_dataset(spec_path)
    tasks = [
        FetchDatasetOperator(
            task_id="fetch",
            dataset=dataset,
            source_uri="{{ params.source_uri }}",
            source_conn_id="{{ params.source_conn_id or '' }}",
            deadline="{{ params.delivery_deadline or '' }}",
            poke_interval="{{ params.delivery_poke_interval or '' }}",
        ),
        ValidateDatasetOperator(task_id="validate", dataset=dataset, label_required=False),
        ComputeStatisticsOperator(task_id="statistics", dataset=dataset),
        ScoreDeliveryOperator(task_id="score", dataset=dataset),
    ]
    chain(*tasks)
    tasks.append(with_run_report(tasks, dataset=dataset, scoring=True))
    return tasks
