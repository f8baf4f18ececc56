from __future__ import annotations

from operators.base import ShardlineOperator, production_asset
from operators.links import StoreLink
from tfjobs.storage.layout import Layout


class ScoreDeliveryOperator(ShardlineOperator):
    """Score the partition's validated delivery with the production model into ``predictions/<dataset>/<partition>/``.

    Batch by batch through the production SavedModel (``production.json``): Parquet with each
    valid row's CSV line, the spec's ``scoring.key`` columns, the prediction and the model
    version. Its inlet is the model's production pointer, its outlet the predictions.
    """

    output_stage = "predictions"
    ui_color = "#a9def9"
    operator_extra_links = (StoreLink("Predictions", "predictions_uri"),)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if not self.inlets:
            asset = production_asset(self.spec, self.store_uri)
            self.inlets = [asset] if asset else []

    def _stage_assets(self, spec_path, store_uri, dataset=None):
        return super()._stage_assets(spec_path, store_uri)  # predictions/<spec name>, whatever the delivery's name

    @staticmethod
    def predictions_uri(layout: Layout, spec) -> str:
        return Layout(layout.root, spec.name, layout.partition).predictions

    def execute(self, context):
        from tfjobs.score import score_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = score_dataset(spec, layout.validated, layout.serving, self.predictions_uri(layout, spec))
        self.log.info("Scored %d rows with version %d: %s", result.rows, result.model_version, result.predictions_uri)
        return self.finish(context, result, rows=result.rows, model_version=result.model_version)
