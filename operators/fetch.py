from __future__ import annotations

from collections.abc import Sequence

from operators.base import ShardlineOperator


class FetchDatasetOperator(ShardlineOperator):
    """Fetch the spec's source into ``raw/<dataset>/<partition>/`` with a manifest.

    :param source_uri: fetch this CSV (path, ``file://``, ``http(s)://``, ``s3://``) instead of
        the spec's source (templated).
    :param landing_uri: fetch the partition's delivery, ``<landing_uri>/<partition>.csv``, instead
        of the spec's source (templated). At most one of ``source_uri`` and ``landing_uri``.
    """

    template_fields: Sequence[str] = (*ShardlineOperator.template_fields, "source_uri", "landing_uri")
    output_stage = "raw"

    def __init__(self, *, source_uri: str = "", landing_uri: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.source_uri = source_uri
        self.landing_uri = landing_uri

    def execute(self, context):
        from tfjobs.fetch import fetch_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = fetch_dataset(
                spec, layout.raw, partition=self.partition, source_uri=self.source_uri, landing_uri=self.landing_uri
            )
        self.log.info("Fetched %d rows from %s to %s", result.rows, result.source, result.data_uri)
        return self.finish(context, result, manifest=result.manifest_uri, rows=result.rows)
