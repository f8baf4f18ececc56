"""The training input pipeline: every row once per epoch, a new order each epoch, with or without the cache."""

import collections

import numpy as np
import pytest

from tfjobs.features import NUMBERS
from tfjobs.storage.input_pipeline import open_shards, training_batches
from tfjobs.features.preprocessing import FeaturePreprocessor
from tfjobs.storage.store import read_json


def epoch_rows(dataset):
    rows = []
    for features, label in dataset:
        numeric = features[NUMBERS].numpy()
        island = features["island"].numpy()
        rows += [(tuple(np.round(n, 5)), int(i), int(y)) for n, i, y in zip(numeric, island, label.numpy())]
    return rows


@pytest.fixture(scope="module")
def shards_and_preprocessor(penguins_pipeline):
    run = penguins_pipeline
    with open_shards(run.shard.manifest_uri, "train") as shards:
        yield shards, FeaturePreprocessor(read_json(run.adapt.state_uri)), run.spec.label.name


@pytest.mark.parametrize("cache", [False, True])
def test_each_epoch_has_every_row_once_in_a_new_order(shards_and_preprocessor, cache):
    shards, preprocessor, label = shards_and_preprocessor
    in_order = epoch_rows(training_batches(shards, preprocessor, label, 16))
    dataset = training_batches(shards, preprocessor, label, 16, shuffle_rows=64, seed=3, cache=cache)
    first, second = epoch_rows(dataset), epoch_rows(dataset)
    assert len(in_order) == shards.records
    assert collections.Counter(first) == collections.Counter(second) == collections.Counter(in_order)
    assert first != in_order and second != first


def test_batches_have_the_requested_size_and_count(shards_and_preprocessor):
    shards, preprocessor, label = shards_and_preprocessor
    dataset = training_batches(shards, preprocessor, label, 16, shuffle_rows=64, seed=1)
    sizes = [int(y.shape[0]) for _, y in dataset]
    assert len(sizes) == -(-shards.records // 16) == int(dataset.cardinality())
    # Windows are whole batches but the last, so one batch is short (anywhere: windows are shuffled).
    assert sorted(sizes)[1:] == [16] * (len(sizes) - 1) and sum(sizes) == shards.records
