from __future__ import annotations

from airflow.sdk.exceptions import AirflowSkipException

from operators.base import ShardlineOperator
from operators.links import StoreLink
from operators.report import RUN_REPORT_LINK, run_report_uri
from tfjobs.storage.store import join


class ExportServingModelOperator(ShardlineOperator):
    """Publish the blessed inference model to ``serving/<model_name>/<version>/`` (TF Serving layout).

    The version is the run's logical date in Unix seconds. A model the evaluation
    did not bless is not published: the task is skipped with the reasons in its log.
    """

    output_stage = "serving"
    ui_color = "#b5e48c"
    operator_extra_links = (StoreLink("Exported model", "version_uri"), RUN_REPORT_LINK)

    def execute(self, context):
        from tfjobs.export import ExportArgs, NotBlessedError, export_model

        spec = self.load_spec()
        layout = self.layout(context, spec)
        args = ExportArgs(
            spec=spec,
            model_uri=join(layout.run_dir, "train", "training_model.keras"),
            state_uri=join(layout.run_dir, "train", "state.json"),  # the state the model was trained with
            shards_manifest_uri=join(layout.shards, "manifest.json"),
            metrics_uri=join(layout.run_dir, "evaluate", "metrics.json"),
            serving_uri=layout.serving,
            version=self.version(context),
            statistics_uri=join(layout.statistics, "statistics.json"),  # kept with the version: the drift baseline
        )
        try:
            with self.failing_fast():
                result = export_model(args)
        except NotBlessedError as err:
            raise AirflowSkipException(str(err)) from err
        self.log.info("Serving version %d at %s", result.version, result.version_uri)
        payload = self.finish(context, result, version=result.version, model=result.version_uri)
        return {**payload, "run_report_uri": run_report_uri(layout)}
