from __future__ import annotations

from operators.base import ShardlineOperator
from operators.links import StoreLink


class ShardToTFRecordOperator(ShardlineOperator):
    """Split validated rows and write GZIP TFRecord shards of ``tf.train.Example`` with a manifest."""

    output_stage = "shards"
    operator_extra_links = (StoreLink("Manifest", "manifest_uri"),)

    def execute(self, context):
        from tfjobs.shard import shard_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = shard_dataset(spec, layout.validated, layout.shards)
        self.log.info("Wrote %d shards to %s: %s records", result.shards, layout.shards, result.records)
        return self.finish(context, result, manifest=result.manifest_uri, records=result.records)
