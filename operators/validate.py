from __future__ import annotations

from operators.base import ShardlineOperator
from operators.links import StoreLink


class ValidateDatasetOperator(ShardlineOperator):
    """Check raw rows against the spec; write valid rows typed and quarantine the rest with reasons.

    :param label_required: False for a delivery to score: the label is neither required nor
        checked, and each valid row keeps its CSV line and the spec's ``scoring.key`` columns.
    """

    output_stage = "validated"
    operator_extra_links = (
        StoreLink("Validation report", "report_uri"),
        StoreLink("Quarantined rows", "quarantine_uri"),
    )

    def __init__(self, *, label_required: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.label_required = label_required

    def execute(self, context):
        from tfjobs.validate import validate_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = validate_dataset(spec, layout.raw, layout.validated, label_required=self.label_required)
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
