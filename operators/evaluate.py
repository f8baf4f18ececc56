from __future__ import annotations

from operators.base import ShardlineOperator
from operators.links import StoreLink
from tfjobs.storage.store import join


class EvaluateModelOperator(ShardlineOperator):
    """Evaluate the inference model on the test split and bless it against the spec's bounds."""

    operator_extra_links = (StoreLink("Test metrics", "metrics_uri"),)

    def execute(self, context):
        from tfjobs.evaluate import evaluate_model

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            result = evaluate_model(
                spec,
                model_uri=join(layout.run_dir, "train", "training_model.keras"),
                state_uri=join(layout.run_dir, "train", "state.json"),  # the state the model was trained with
                shards_manifest_uri=join(layout.shards, "manifest.json"),
                output_uri=join(layout.run_dir, "evaluate"),
            )
        if result.blessed:
            self.log.info("Test metrics %s: blessed", result.metrics)
        else:
            self.log.warning("Test metrics %s: NOT blessed (%s)", result.metrics, "; ".join(result.failures))
        return self.finish(context, result)
