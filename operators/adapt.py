from __future__ import annotations

from operators.base import ShardlineOperator
from operators.links import StoreLink
from tfjobs.storage.store import join


class AdaptPreprocessingOperator(ShardlineOperator):
    """Adapt the preprocessing (Normalization, StringLookup, ...) on the training shards."""

    output_stage = "preprocessing"
    operator_extra_links = (StoreLink("Preprocessing state", "state_uri"),)

    def execute(self, context):
        from tfjobs.adapt import adapt_preprocessing

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = adapt_preprocessing(spec, join(layout.shards, "manifest.json"), layout.preprocessing)
        self.log.info("Preprocessing state for %d records at %s", result.records, result.state_uri)
        return self.finish(context, result, state=result.state_uri)
