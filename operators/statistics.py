from __future__ import annotations

from operators.base import ShardlineOperator
from operators.links import StoreLink


class ComputeStatisticsOperator(ShardlineOperator):
    """Profile the partition's validated rows per feature and check them for drift against production's data.

    Writes ``statistics/<dataset>/<partition>/statistics.json``. A feature that moved further
    from the production model's training data than the spec's ``drift`` threshold is logged
    as a warning, or, with ``drift.action: stop``, fails the task (without retries) before
    anything is trained or scored, naming the feature, its distance and what moved.
    """

    output_stage = "statistics"
    operator_extra_links = (StoreLink("Statistics", "statistics_uri"),)

    def execute(self, context):
        from tfjobs.statistics import compute_statistics

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = compute_statistics(spec, layout.validated, layout.statistics, serving_uri=layout.serving,
                                        partition=layout.partition)
        self.log.info("Profiled %s on %d rows: %s", result.profiled, result.rows, result.message)
        return self.finish(context, result, statistics=result.statistics_uri, drifted=result.drifted,
                           drift=result.message)
