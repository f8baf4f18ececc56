"""Adding a kind is local: a `boolean` kind defined here runs validate -> shard -> adapt -> train -> export.

Nothing outside this file knows about it: the kind registers itself by subclassing
``Feature``, and every step asks the spec's features what to do.
"""

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_spec
from tfjobs.features import Encoded, Feature, KindOptions, ServingInput, Statistics
from tfjobs.features import base as feature_registry
from tfjobs.features.base import Cleaned, as_text, strip_and_mark_missing, strip_and_mark_missing_tensor
from tfjobs.storage.examples import Column

TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


class BooleanOptions(KindOptions):
    missing_as: bool = False  # what a missing value means


class TrueShare(Statistics):
    def __init__(self):
        self.true = self.rows = 0

    def update(self, values):
        self.true += int(np.asarray(values).sum())
        self.rows += len(values)

    def merge(self, other):
        self.true, self.rows = self.true + other.true, self.rows + other.rows

    def result(self):
        return {"true_share": self.true / max(self.rows, 1), "rows": self.rows}


@pytest.fixture(scope="module")
def boolean_kind():
    class Boolean(Feature):
        kind = "boolean"
        summary = "yes or no"
        Options = BooleanOptions

        def column(self):
            return Column(self.name, "int64")

        def serving(self):
            return ServingInput("int64", "1 or 0")

        def clean(self, raw, na_values):
            values, missing = strip_and_mark_missing(raw, na_values)
            lowered = values.str.lower()
            unknown = ~missing & ~lowered.isin(TRUE + FALSE).to_numpy()
            flags = np.where(missing, self.options.missing_as, lowered.isin(TRUE).to_numpy()).astype(np.int64)
            return Cleaned(flags, missing, [(unknown, "{value} is neither yes nor no")])

        def parse_text(self, text, na_values):
            import tensorflow as tf

            values, missing = strip_and_mark_missing_tensor(tf.strings.lower(text), na_values)
            truth = tf.reduce_any(tf.equal(tf.expand_dims(values, -1), list(TRUE)), axis=-1)
            return tf.cast(tf.where(missing, self.options.missing_as, truth), tf.int64)

        def statistics(self):
            return TrueShare()

        def encoded(self, state):
            return Encoded("number")

        def encode(self, values, encoder_layers, state):
            import tensorflow as tf

            return tf.cast(values, tf.float32) - state["true_share"]

        def edge_values(self, state):
            return [0, 1]

        def text_variants(self, values, na_values):
            return as_text(["Yes" if v else "no" for v in np.asarray(values).tolist()], [False] * len(values), na_values)

    yield Boolean
    del feature_registry._KINDS["boolean"]


def test_a_kind_defined_in_a_test_runs_the_pipeline(boolean_kind, tmp_path):
    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.evaluate import evaluate_model
    from tfjobs.export import ExportArgs, export_model
    from tfjobs.fetch import fetch_dataset
    from tfjobs.shard import shard_dataset
    from tfjobs.storage.layout import Layout
    from tfjobs.storage.store import read_json
    from tfjobs.train import TrainArgs, train_model
    from tfjobs.validate import validate_dataset

    rng = np.random.default_rng(3)
    rows = 400
    member = rng.random(rows) < 0.5
    frame = pd.DataFrame({
        "member": np.where(member, rng.choice(["yes", " TRUE", "1"], rows), rng.choice(["no", "False ", "0"], rows)),
        "size": rng.normal(0, 1, rows).round(3),
        "kind": np.where(member, "a", "b"),  # the label is the flag: a model must learn it from the new kind
    })
    frame.loc[7, "member"] = "maybe"  # quarantined with the kind's own reason
    frame.to_csv(tmp_path / "in.csv", index=False)
    spec = tiny_spec(features={"member": {"kind": "boolean"}, "size": {"kind": "numeric"}},
                     training={"epochs": 8, "batch_size": 16, "learning_rate": 0.05})
    layout = Layout(str(tmp_path / "store"), spec.name, "2026-11-25", run="r1", model_name="toy")

    fetch_dataset(spec, layout.raw, source_uri=str(tmp_path / "in.csv"))
    validated = validate_dataset(spec, layout.raw, layout.validated)
    assert validated.reasons == {"member: is neither yes nor no": 1} and validated.rows_valid == rows - 1
    shards = shard_dataset(spec, layout.validated, layout.shards)
    adapted = adapt_preprocessing(spec, shards.manifest_uri, layout.preprocessing)
    state = read_json(adapted.state_uri)["features"]["member"]
    assert state["kind"] == "boolean" and 0.35 < state["true_share"] < 0.65
    trained = train_model(TrainArgs(spec, shards.manifest_uri, adapted.state_uri, layout.run_dir + "/train"))
    evaluation = evaluate_model(spec, trained.model_uri, adapted.state_uri, shards.manifest_uri,
                                layout.run_dir + "/evaluate")
    assert evaluation.metrics["accuracy"] > 0.95
    exported = export_model(ExportArgs(spec, trained.model_uri, adapted.state_uri, shards.manifest_uri,
                                       evaluation.metrics_uri, layout.serving, 1764028800))
    # The skew check in a fresh process passed, typed and as CSV text ("Yes", " no\t", ...).
    assert exported.max_skew < 1e-5
    metadata = read_json(exported.version_uri + "/shardline.json")
    assert metadata["signature"]["inputs"]["member"] == {"kind": "boolean", "dtype": "int64", "send": "1 or 0"}
