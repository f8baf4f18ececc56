from __future__ import annotations

from collections.abc import Sequence

from operators.base import ShardlineOperator
from operators.links import StoreLink
from operators.score import ScoreDeliveryOperator

RUN_REPORT_LINK = StoreLink("Run report", "run_report_uri")


class RunReportOperator(ShardlineOperator):
    """Write the run's HTML report, ``runs/<dataset>/<run>/report.html``, from what the run left on the store.

    Runs whatever happened upstream (the pipelines make it a teardown task: it does not
    change the run's state), so a run stopped by drift or not promoted says why.

    :param scoring: a scoring run: the report shows its predictions (templated).
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields,)
    operator_extra_links = (RUN_REPORT_LINK,)
    ui_color = "#e4c1f9"

    def __init__(self, *, scoring: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scoring = scoring

    def execute(self, context):
        from tfjobs.run_report import write_run_report

        spec = self.load_spec()
        layout = self.layout(context, spec)
        predictions = ScoreDeliveryOperator.predictions_uri(layout, spec) if self.scoring else ""
        with self.failing_fast():
            uri = write_run_report(spec, layout, predictions)
        self.log.info("Run report: %s", uri)
        return {"run_report_uri": uri}


def run_report_uri(layout) -> str:
    """Where the run's report is (the evaluate and export tasks link to it)."""
    from tfjobs.storage.store import join

    return join(layout.run_dir, "report.html")
