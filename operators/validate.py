from __future__ import annotations

from operators.base import ShardlineOperator
from operators.links import StoreLink


class ValidateDatasetOperator(ShardlineOperator):
    """Check raw rows against the spec; write valid rows typed and quarantine the rest with reasons."""

    output_stage = "validated"
    operator_extra_links = (
        StoreLink("Validation report", "report_uri"),
        StoreLink("Quarantined rows", "quarantine_uri"),
    )

    def execute(self, context):
        from tfjobs.validate import validate_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = validate_dataset(spec, layout.raw, layout.validated)
        if result.rows_quarantined:
            self.log.warning(
                "Quarantined %d of %d rows (%s); see %s",
                result.rows_quarantined, result.rows_in, result.reasons, result.quarantine_uri,
            )
        self.log.info("%d valid rows in %s", result.rows_valid, result.data_uri)
        return self.finish(
            context, result, report=result.report_uri, rows_valid=result.rows_valid,
            rows_quarantined=result.rows_quarantined,
        )
