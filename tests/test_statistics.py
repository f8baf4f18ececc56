"""The statistics step profiles a partition and checks it against the production model's training data."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_spec
from tfjobs.promote import set_production
from tfjobs.statistics import DriftError, compute_statistics
from tfjobs.storage.store import write_json
from tfjobs.validate import validate_dataset

ROWS = 600


def deliver(store: Path, partition: str, sizes, colours) -> str:
    """A raw partition as the fetch step leaves it, validated; the validated prefix."""
    raw = store / "raw" / "tiny" / partition
    raw.mkdir(parents=True)
    frame = pd.DataFrame({"size": sizes, "colour": colours, "batch": 7, "kind": ["a", "b"] * (len(sizes) // 2)})
    frame.to_csv(raw / "data.csv", index=False)
    write_json(str(raw / "manifest.json"), {"file": "data.csv", "sha256": partition, "rows": len(frame)})
    validated = store / "validated" / "tiny" / partition
    validate_dataset(tiny_spec(), str(raw), str(validated))
    return str(validated)


@pytest.fixture
def production(tmp_path):
    """A store whose production model (version 1) was trained on partition 'day1'; its serving prefix."""
    rng = np.random.default_rng(3)
    validated = deliver(tmp_path, "day1", rng.normal(10, 2, ROWS), rng.choice(["red", "blue"], ROWS))
    result = compute_statistics(tiny_spec(), validated, str(tmp_path / "statistics" / "tiny" / "day1"))
    version = tmp_path / "serving" / "tiny" / "1"
    version.mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"")
    shutil.copy(result.statistics_uri, version / "statistics.json")  # what the export step keeps with a version
    set_production(str(version.parent), 1, reason="first", by="test")
    return tmp_path, str(version.parent)


def test_a_first_partition_is_profiled_and_compared_with_nothing(tmp_path):
    rng = np.random.default_rng(0)
    validated = deliver(tmp_path, "day1", rng.normal(10, 2, ROWS), rng.choice(["red", "blue"], ROWS))
    result = compute_statistics(tiny_spec(), validated, str(tmp_path / "out"), str(tmp_path / "serving" / "tiny"))
    statistics = json.loads(Path(result.statistics_uri).read_text())
    assert result.rows == ROWS and result.profiled == ["batch", "colour", "size"] and result.drifted == {}
    assert statistics["features"]["size"]["mean"] == pytest.approx(10, abs=0.3)
    assert {v["value"] for v in statistics["features"]["colour"]["top_values"]} == {"red", "blue"}
    assert result.message == "No production model: nothing to compare with"


def test_a_delivery_like_the_training_data_does_not_drift(production):
    store, serving = production
    rng = np.random.default_rng(4)
    validated = deliver(store, "day2", rng.normal(10, 2, ROWS), rng.choice(["red", "blue"], ROWS))
    result = compute_statistics(tiny_spec(), validated, str(store / "statistics/tiny/day2"), serving)
    assert result.drifted == {} and result.baseline == "production version 1"
    assert result.message == "No feature drifted against the data of production version 1 (partition day1)"


def test_a_shifted_number_and_a_new_category_are_named_with_their_distances(production, caplog):
    store, serving = production
    rng = np.random.default_rng(5)
    colours = rng.choice(["red", "blue"], ROWS).astype(object)
    colours[: ROWS // 2] = "green"
    validated = deliver(store, "day3", rng.normal(14, 2, ROWS), colours)
    result = compute_statistics(tiny_spec(), validated, str(store / "statistics/tiny/day3"), serving)  # warn
    assert set(result.drifted) == {"size", "colour"} and result.drifted["colour"] == pytest.approx(0.5)
    assert "size: jensen-shannon" in result.message and "mean 10" in result.message
    assert "colour: l-infinity 0.500 > 0.1 ('green' (never seen in training): 0.0% of rows -> 50.0%)" in result.message
    assert "drift.action: warn, so the run goes on" in caplog.text

    stop = tiny_spec(drift={"action": "stop", "features": {"colour": 0.6}})
    with pytest.raises(DriftError, match=r"1 feature\(s\) drifted .* size: jensen-shannon .* drift\.action is stop"):
        compute_statistics(stop, validated, str(store / "statistics/tiny/day3"), serving)
    written = json.loads((store / "statistics/tiny/day3/statistics.json").read_text())
    assert written["drift"]["drifted"] == ["size"]  # written before the step stops: the report shows it
    with pytest.raises(DriftError):  # and a re-run that finds it up to date stops again
        compute_statistics(stop, validated, str(store / "statistics/tiny/day3"), serving)
