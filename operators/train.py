from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowFailException

from operators.base import CONFIG_SECTION, ShardlineOperator
from operators.links import StoreLink
from tfjobs.deadlines import parse_duration
from tfjobs.storage.store import join

#: Training's time limit is this (reading shards, building and saving the model) plus epochs x epoch_timeout.
TRAINING_SETUP_TIMEOUT = datetime.timedelta(minutes=30)
DEFAULT_EPOCH_TIMEOUT = "10m"


def gpu_queue() -> str:
    """``[shardline] gpu_queue`` (``AIRFLOW__SHARDLINE__GPU_QUEUE``): the Celery queue GPU workers serve."""
    return conf.get(CONFIG_SECTION, "gpu_queue", fallback="gpu") or "gpu"


class TrainModelOperator(ShardlineOperator):
    """Train the spec's model with ``fit()`` on the shards; checkpoints and TensorBoard logs under the run.

    :param hyperparameters: overrides of the spec's training settings, e.g.
        ``{"epochs": "{{ params.epochs }}"}`` (templated).
    :param model_kind: which registered model to build; empty for the spec's (templated).
    :param force: retrain even if a model of the same inputs and settings exists (templated).
    :param queue: the Celery queue to run on; by default ``[shardline] gpu_queue`` ("gpu"), which
        GPU workers serve. Set it per task, or per DAG in ``default_args``, to train elsewhere.
    :param epoch_timeout: the most one epoch may take, e.g. ``"10m"`` (templated). Unless the task
        or the DAG sets an ``execution_timeout``, training is stopped after 30 minutes plus the
        epochs to run times this, so that a run of many epochs cannot hold the GPU queue forever.
    :param tuned_by: the task id of a tuning step (``PickBestTrialOperator``) whose best settings
        to train with, under ``hyperparameters`` and ``model_kind``; an empty override ('') is unset.
    """

    template_fields: Sequence[str] = (
        *ShardlineOperator.template_fields, "hyperparameters", "model_kind", "force", "epoch_timeout",
    )
    # Derived from the epochs once the Params are rendered (training_timeout).
    default_execution_timeout = None
    template_fields_renderers = {**ShardlineOperator.template_fields_renderers, "hyperparameters": "json"}
    output_stage = "runs"
    ui_color = "#f9c784"
    operator_extra_links = (StoreLink("TensorBoard logs", "tensorboard_uri"), StoreLink("Trained model", "model_uri"))

    def __init__(
        self,
        *,
        hyperparameters: dict[str, Any] | None = None,
        model_kind: str = "",
        force: bool | str = False,
        queue: str | None = None,
        epoch_timeout: str = DEFAULT_EPOCH_TIMEOUT,
        tuned_by: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(queue=queue or gpu_queue(), **kwargs)
        self.tuned_by = tuned_by
        self.derives_execution_timeout = self.execution_timeout is None
        self.hyperparameters = hyperparameters or {}
        self.model_kind = model_kind
        self.force = force
        self.epoch_timeout = epoch_timeout

    def render_template_fields(self, context, jinja_env=None) -> None:
        # The epochs are a Param: the time limit can only be known once they are rendered, and
        # Airflow starts the execution_timeout clock after rendering.
        super().render_template_fields(context, jinja_env)
        if self.derives_execution_timeout:
            self.execution_timeout = self.training_timeout()

    def training_timeout(self) -> datetime.timedelta:
        """30 minutes plus ``epoch_timeout`` for each epoch to run (the Param's, else the spec's)."""
        epochs = self.hyperparameters.get("epochs") or self.load_spec().training.epochs
        try:
            return TRAINING_SETUP_TIMEOUT + int(epochs) * parse_duration(self.epoch_timeout)
        except ValueError as err:
            raise AirflowFailException(f"{self.task_id}: epoch_timeout {self.epoch_timeout!r}: {err}") from None

    def execute(self, context):
        from tfjobs.train import TrainArgs, train_model

        spec = self.load_spec()
        layout = self.layout(context, spec)
        tuned = (context["ti"].xcom_pull(task_ids=self.tuned_by) if self.tuned_by else None) or {}
        if tuned.get("tuned"):
            self.log.info("Training with trial %d's settings %s (study %s), under the run's own %s",
                          tuned["best_trial"], tuned["best_settings"], tuned["study_name"], self.explicit)
        args = TrainArgs(
            spec=spec,
            shards_manifest_uri=join(layout.shards, "manifest.json"),
            state_uri=join(layout.preprocessing, "state.json"),
            output_uri=join(layout.run_dir, "train"),
            hyperparameters=self.explicit,
            model_kind=self.model_kind,
            force=str(self.force).lower() in ("true", "1", "yes"),
            tuned_settings=tuned.get("best_settings", {}),
            reuse_uri=tuned.get("best_trial_uri", ""),
        )
        with self.failing_fast():
            result = train_model(args)
        self.log.info(
            "Trained %s for %d epochs (best %d): %s -> %s",
            result.model_kind, result.epochs_run, result.best_epoch, result.metrics, result.model_uri,
        )
        if tuned.get("tuned"):
            return self.finish(context, result, model=result.model_uri, tuned_settings=tuned["best_settings"],
                               study=tuned["study_name"], trial=tuned["best_trial"])
        return self.finish(context, result, model=result.model_uri)

    @property
    def explicit(self) -> dict[str, Any]:
        """The overrides the run sets: an empty Param ('' or None) leaves the setting to the spec or the search."""
        return {name: value for name, value in self.hyperparameters.items() if value not in ("", None)}
