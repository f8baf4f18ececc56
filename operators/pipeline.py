"""The training pipeline every Shardline DAG runs, wired to the trigger form's Params."""

from __future__ import annotations

from airflow.sdk import BaseOperator, chain

from operators.adapt import AdaptPreprocessingOperator
from operators.evaluate import EvaluateModelOperator
from operators.export import ExportServingModelOperator
from operators.fetch import FetchDatasetOperator
from operators.params import HYPERPARAMETERS, FeatureChoices, feature_option_templates
from operators.promote import PromoteModelOperator
from operators.report import RunReportOperator
from operators.shard import ShardToTFRecordOperator
from operators.statistics import ComputeStatisticsOperator
from operators.train import TrainModelOperator
from operators.tune import OPTIONAL_HYPERPARAMETERS, OPTIONAL_MODEL_KIND, tuning_steps
from operators.validate import ValidateDatasetOperator


def training_pipeline(tuning: bool = False, feature_choices: FeatureChoices | None = None) -> list[BaseOperator]:
    """fetch -> validate -> statistics -> shard -> adapt -> train -> evaluate -> export -> promote, chained,
    and the run report as a teardown (it runs whatever happened, and does not change the run's state).

    Call it inside a DAG whose ``default_args`` name the spec (``{"spec": path}``)
    and whose ``params`` come from :func:`operators.params.training_params`, with the same
    ``feature_choices``: every step then reads the spec with the run's choices of those options.

    ``tuning=True`` puts the search between adapt and train (``tune_plan``, the mapped
    ``tune`` runners, ``tune_best``; :mod:`operators.tune`), switched per run by the
    ``tuning`` Param: the DAG's ``params`` then come from :func:`operators.tune.tuning_params`.
    """
    options = {"feature_options": feature_option_templates(feature_choices)} if feature_choices else {}
    tasks = [
        # `or ''`: the form sends null for an empty optional field.
        FetchDatasetOperator(
            task_id="fetch",
            source_uri="{{ params.source_uri or '' }}",
            source_conn_id="{{ params.source_conn_id or '' }}",
            deadline="{{ params.delivery_deadline or '' }}",
            poke_interval="{{ params.delivery_poke_interval or '' }}",
            **options,
        ),
        ValidateDatasetOperator(task_id="validate", **options),
        ComputeStatisticsOperator(task_id="statistics", **options),
        ShardToTFRecordOperator(task_id="shard", **options),
        AdaptPreprocessingOperator(task_id="adapt", **options),
        *(tuning_steps(**options) if tuning else ()),
        # In a DAG that can tune, train takes the best trial's settings, under the Params the run sets.
        TrainModelOperator(
            task_id="train",
            hyperparameters=OPTIONAL_HYPERPARAMETERS if tuning else HYPERPARAMETERS,
            model_kind=OPTIONAL_MODEL_KIND if tuning else "{{ params.model }}",
            force="{{ params.force_retrain }}",
            epoch_timeout="{{ params.epoch_timeout }}",
            tuned_by="tune_best" if tuning else None,
            **options,
        ),
        # .get: a DAG whose form predates the Param still renders.
        EvaluateModelOperator(task_id="evaluate", force="{{ params.get('force_promotion', False) }}", **options),
        ExportServingModelOperator(task_id="export", **options),
    ]
    tasks.append(PromoteModelOperator(
        task_id="promote", version="{{ ti.xcom_pull(task_ids='export')['version'] }}", **options))
    chain(*tasks)
    tasks.append(with_run_report(tasks, **options))
    return tasks


def with_run_report(tasks: list[BaseOperator], **kwargs) -> BaseOperator:
    """The run report after ``tasks``, as a teardown: it runs whatever they did, and the run's state is theirs."""
    report = RunReportOperator(task_id="report", **kwargs)
    tasks >> report
    return report.as_teardown(on_failure_fail_dagrun=False)
