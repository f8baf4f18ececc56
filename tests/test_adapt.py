import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_spec
from tfjobs.adapt import adapt_preprocessing
from tfjobs.features.base import RunningMoments
from tfjobs.storage.input_pipeline import open_shards, raw_batches
from tfjobs.storage.store import read_json


@pytest.fixture(scope="module")
def train_rows(penguins_pipeline):
    with open_shards(penguins_pipeline.shard.manifest_uri, "train") as shards:
        batches = list(raw_batches(shards, 10_000).as_numpy_iterator())
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_numeric_statistics_match_keras_normalization_adapt(penguins_pipeline, train_rows):
    state = read_json(penguins_pipeline.adapt.state_uri)
    for name in ("bill_length_mm", "body_mass_g"):
        values = train_rows[name]
        present = values[~np.isnan(values)]
        layer = keras.layers.Normalization(axis=None)
        layer.adapt(present)
        feature = state["features"][name]
        assert feature["mean"] == pytest.approx(float(np.ravel(layer.mean)[0]), rel=1e-5)
        assert feature["variance"] == pytest.approx(float(np.ravel(layer.variance)[0]), rel=1e-4)
        assert feature["missing"] == int(np.isnan(values).sum())


def test_vocabulary_matches_string_lookup_adapt(penguins_pipeline, train_rows):
    state = read_json(penguins_pipeline.adapt.state_uri)
    lookup = keras.layers.StringLookup()
    lookup.adapt(tf.constant(train_rows["island"]))
    keras_vocabulary = [v for v in lookup.get_vocabulary() if v != "[UNK]"]
    ours = state["features"]["island"]
    assert set(ours["vocabulary"]) == set(keras_vocabulary) | {""}  # plus the missing token
    counts = collections.Counter(v.decode() for v in train_rows["island"])
    assert ours["counts"][: len(counts)] == sorted(counts.values(), reverse=True)


def vocabulary(values, **options):
    """The adapted vocabulary and counts of a categorical feature ``c`` over ``values``."""
    feature = tiny_spec(features={"c": {"kind": "categorical", **options}}).feature("c")
    statistics = feature.statistics()
    statistics.update(np.array(values, dtype=object))
    state = statistics.result()
    return state["vocabulary"], state["counts"]


def test_missing_tokens_always_have_an_index(penguins_pipeline):
    state = read_json(penguins_pipeline.adapt.state_uri)
    assert "" in state["features"]["sex"]["vocabulary"]
    assert -1 in state["features"]["year"]["vocabulary"]
    assert vocabulary(["b", "a", "c", "c", "b", "a", "c", "c", "c"]) == (["c", "a", "b", ""], [5, 2, 2, 0])


def test_running_moments_merge_batches_exactly():
    values = np.random.default_rng(0).normal(1e4, 3.0, size=10_001)
    moments = RunningMoments()
    for chunk in np.array_split(values, 7):
        moments.update(chunk)
    assert moments.mean == pytest.approx(values.mean(), rel=1e-12)
    assert moments.variance == pytest.approx(values.var(), rel=1e-9)
    assert (moments.min, moments.max) == (values.min(), values.max())


def test_adapt_is_not_repeated_on_the_same_shards(penguins_pipeline):
    run = penguins_pipeline
    again = adapt_preprocessing(run.spec, run.shard.manifest_uri, run.layout.preprocessing)
    assert not again.rewritten and again.records == run.adapt.records


def test_adapt_needs_finished_shards(penguins_spec, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the shard step first"):
        adapt_preprocessing(penguins_spec, str(tmp_path / "manifest.json"), str(tmp_path / "out"))


def test_values_rarer_than_min_frequency_stay_out_of_the_vocabulary():
    values = ["common"] * 30 + ["rare"] * 4 + [""] * 2
    assert vocabulary(values, min_frequency=5) == (["common", ""], [30, 2])  # the missing token is kept
    assert vocabulary(values)[0] == ["common", "rare", ""]
    assert vocabulary(values, max_tokens=1) == (["common", ""], [30, 2])  # capped, the missing token still kept
