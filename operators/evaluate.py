from __future__ import annotations

from collections.abc import Sequence

from operators.base import ShardlineOperator, forced_by
from operators.links import StoreLink
from operators.report import RUN_REPORT_LINK, run_report_uri
from tfjobs.storage.store import join


class EvaluateModelOperator(ShardlineOperator):
    """Evaluate the run's model against the spec's bounds and against the model in production.

    Both are scored on the same test rows (production's through its own SavedModel); the
    verdict (promote, keep production, not blessed), both models' metrics and the reason go
    to ``metrics.json``, the task log and the asset event.

    :param force: promote even when the model is worse than production's beyond the spec's
        change thresholds (templated; the *Force promotion* Param). Recorded as forced, with the
        run's triggering user and start. It cannot pass the absolute bounds.
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields, "force")
    output_stage = "evaluations"
    operator_extra_links = (StoreLink("Test metrics", "metrics_uri"), RUN_REPORT_LINK)

    def __init__(self, *, force: bool | str = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.force = force

    def execute(self, context):
        from tfjobs.evaluate import Forced, evaluate_model

        spec = self.load_spec()
        layout = self.layout(context, spec)
        force = Forced(**forced_by(context)) if str(self.force).lower() in ("true", "1", "yes") else None
        with self.failing_fast():
            result = evaluate_model(
                spec,
                model_uri=join(layout.run_dir, "train", "training_model.keras"),
                state_uri=join(layout.run_dir, "train", "state.json"),  # the state the model was trained with
                shards_manifest_uri=join(layout.shards, "manifest.json"),
                output_uri=join(layout.run_dir, "evaluate"),
                serving_uri=layout.serving,
                force=force,
            )
        if result.champion_version is not None:
            self.log.info("Production version %d on the same test rows: %s", result.champion_version,
                          result.champion_metrics)
        if result.blessed:
            self.log.info("Test metrics %s: %s (%s)", result.metrics, result.verdict, result.reason)
        else:
            self.log.warning("Test metrics %s: %s (%s)", result.metrics, result.verdict.upper(), result.reason)
        payload = self.finish(context, result, verdict=result.verdict, reason=result.reason, metrics=result.metrics,
                              champion_version=result.champion_version, champion_metrics=result.champion_metrics)
        return {**payload, "run_report_uri": run_report_uri(layout)}
