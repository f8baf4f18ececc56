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


def epoch_batches(dataset):
    """Each batch's rows, as a set: which rows share a batch, whatever their order in it."""
    return [frozenset(epoch_rows([(features, label)])) for features, label in dataset]


def test_cached_epochs_draw_batches_from_other_rows_each_epoch(shards_and_preprocessor):
    """Windows of one batch: were each cached window its own batch every epoch, a row would meet the
    same 15 rows epoch after epoch; re-mixed across windows, it meets others."""
    shards, preprocessor, label = shards_and_preprocessor
    dataset = training_batches(shards, preprocessor, label, 16, shuffle_rows=16, seed=3, cache=True)
    met = collections.defaultdict(set)
    for _ in range(5):
        batches = epoch_batches(dataset)
        assert len(batches) == int(dataset.cardinality()) and sorted(map(len, batches))[1:] == [16] * (len(batches) - 1)
        for batch in batches:
            for row in batch:
                met[row] |= batch - {row}
    assert np.mean([len(rows) for rows in met.values()]) > 2 * 15


@pytest.mark.parametrize("cache", [False, True])
def test_deterministic_batches_are_the_same_for_the_same_seed(shards_and_preprocessor, cache, monkeypatch):
    """Blocks of 8 records: the two readers hand over 30 blocks, in turns (else in whichever order they come)."""
    shards, preprocessor, label = shards_and_preprocessor
    monkeypatch.setattr("tfjobs.storage.input_pipeline.BLOCK_RECORDS", 8)

    def two_epochs(seed):
        dataset = training_batches(shards, preprocessor, label, 16, shuffle_rows=64, seed=seed, cache=cache,
                                   deterministic=True)
        return epoch_rows(dataset), epoch_rows(dataset)

    first = two_epochs(5)
    assert first == two_epochs(5) and first[0] != first[1]
    assert two_epochs(6) != first
