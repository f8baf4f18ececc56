from __future__ import annotations

from collections.abc import Sequence

from operators.base import ShardlineOperator
from operators.links import StoreLink


class FetchDatasetOperator(ShardlineOperator):
    """Fetch the spec's source into ``raw/<dataset>/<partition>/`` with a manifest.

    :param source_uri: fetch this CSV (path, ``file://``, ``http(s)://``, ``s3://``) instead of
        the spec's source (templated). ``{partition}`` in it becomes the partition, so that each
        run fetches its day's delivery from a landing prefix: ``s3://landing/penguins-{partition}.csv``.
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields, "source_uri")
    output_stage = "raw"
    operator_extra_links = (StoreLink("Manifest", "manifest_uri"),)

    def __init__(self, *, source_uri: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.source_uri = source_uri

    def execute(self, context):
        from tfjobs.fetch import fetch_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = fetch_dataset(spec, layout.raw, partition=self.partition, source_uri=self.source_uri)
        self.log.info("Fetched %d rows from %s to %s", result.rows, result.source, result.data_uri)
        return self.finish(context, result, manifest=result.manifest_uri, rows=result.rows)
