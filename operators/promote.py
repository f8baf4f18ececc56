"""Moving the production pointer: promote a run's published model, or roll back to an earlier version."""

from __future__ import annotations

from collections.abc import Sequence

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from operators.base import ShardlineOperator, forced_by, production_asset
from operators.links import StoreLink
from tfjobs.storage.store import join


class _ProductionOperator(ShardlineOperator):
    """Base of the steps that update ``serving/<model>/production.json`` (their outlet asset)."""

    output_stage = "production"
    ui_color = "#b5e48c"
    operator_extra_links = (StoreLink("Production pointer", "production_uri"),
                            StoreLink("TF Serving config", "models_config_uri"))

    def _stage_assets(self, spec_path, store_uri, dataset=None):
        asset = production_asset(spec_path, store_uri)
        return [asset] if asset else []

    def finish_promotion(self, context, result):
        self.log.info("Production is version %d (previous %s, canary %s); pruned %s", result.version,
                      result.previous, result.canary, result.pruned or "nothing")
        return self.finish(context, result, version=result.version, previous=result.previous)


class PromoteModelOperator(_ProductionOperator):
    """Point production at the version this run published, if its evaluation says so (TFX's Pusher).

    The verdict and reason come from the run's ``metrics.json`` (challenger against champion,
    forced or not); ``production.json`` records them with the run's metrics, who triggered the
    run and when; TF Serving's ``models.config`` follows. A backfilled older day does not
    displace a newer day's production version (the task is skipped, saying so) unless forced.
    Versions beyond the spec's ``serving.keep_versions`` are pruned, oldest first, never
    production's.

    :param version: the version the export step published (templated; the training pipeline
        pulls it from the export task's result).
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields, "version")

    def __init__(self, *, version: int | str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.version = version

    def execute(self, context):
        from tfjobs.promote import NotPromoted, promote_evaluated
        from tfjobs.storage.store import read_json

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            evaluation = read_json(join(layout.run_dir, "evaluate", "metrics.json"))
            try:
                result = promote_evaluated(layout.serving, int(self.version), evaluation, run=layout.run,
                                           by=forced_by(context)["by"], keep_versions=spec.serving.keep_versions,
                                           model_name=spec.model_name)
            except NotPromoted as skipped:
                raise AirflowSkipException(str(skipped)) from None
        return self.finish_promotion(context, result)


class RollbackModelOperator(_ProductionOperator):
    """Point production back at an earlier published version (by default the previous production).

    :param version: the version to serve; empty for the one production was before (templated).
    :param reason: why, recorded in ``production.json`` (templated).
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields, "version", "reason")

    def __init__(self, *, version: int | str = "", reason: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.version = version
        self.reason = reason

    def execute(self, context):
        from tfjobs.rollback import ProductionChangedError, rollback

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            try:
                result = rollback(layout.serving, int(self.version) if str(self.version).strip() else None,
                                  by=forced_by(context)["by"], reason=self.reason)
            except ProductionChangedError as err:  # a retry would roll back the promotion that overtook it
                raise AirflowFailException(f"{type(err).__name__}: {err}") from err
        return self.finish_promotion(context, result)


def rollback_params() -> dict:
    """The rollback DAG's form: which version (empty: the previous production) and why."""
    from airflow.sdk import Param

    return {
        "version": Param(None, type=["null", "integer"], minimum=1, title="Version",
                         description="The published version to serve; empty for the one production was before."),
        "reason": Param("", type=["null", "string"], title="Reason", description="Why, for production.json's record."),
    }
