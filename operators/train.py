from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import conf

from operators.base import CONFIG_SECTION, ShardlineOperator
from operators.links import StoreLink
from tfjobs.storage.store import join


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
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields, "hyperparameters", "model_kind", "force")
    template_fields_renderers = {"hyperparameters": "json"}
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
        **kwargs,
    ) -> None:
        super().__init__(queue=queue or gpu_queue(), **kwargs)
        self.hyperparameters = hyperparameters or {}
        self.model_kind = model_kind
        self.force = force

    def execute(self, context):
        from tfjobs.train import TrainArgs, train_model

        spec = self.load_spec()
        layout = self.layout(context, spec)
        args = TrainArgs(
            spec=spec,
            shards_manifest_uri=join(layout.shards, "manifest.json"),
            state_uri=join(layout.preprocessing, "state.json"),
            output_uri=join(layout.run_dir, "train"),
            hyperparameters=self.hyperparameters,
            model_kind=self.model_kind,
            force=str(self.force).lower() in ("true", "1", "yes"),
        )
        with self.failing_fast():
            result = train_model(args)
        self.log.info(
            "Trained %s for %d epochs (best %d): %s -> %s",
            result.model_kind, result.epochs_run, result.best_epoch, result.metrics, result.model_uri,
        )
        return self.finish(context, result, model=result.model_uri)
