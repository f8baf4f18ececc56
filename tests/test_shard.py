import numpy as np
import palmerpenguins
import pandas as pd
import pytest
import tensorflow as tf

from tfjobs.storage.input_pipeline import open_shards, raw_batches
from tfjobs.shard import shard_dataset
from tfjobs.storage.store import read_json, sha256_file, write_json


def test_every_valid_row_lands_in_exactly_one_split(penguins_pipeline):
    run = penguins_pipeline
    records = run.shard.records
    assert sum(records.values()) == run.validate.rows_valid == 344
    fractions = {s: n / 344 for s, n in records.items()}
    assert fractions["train"] == pytest.approx(0.7, abs=0.08)
    assert fractions["test"] == pytest.approx(0.15, abs=0.06)


def test_shards_hold_the_validated_values(penguins_pipeline):
    run = penguins_pipeline
    expected = pd.read_parquet(run.validate.data_uri)
    parsed = []
    for split in ("train", "eval", "test"):
        with open_shards(run.shard.manifest_uri, split) as shards:
            for batch in raw_batches(shards, 1000):
                parsed.append(pd.DataFrame({k: v.numpy() for k, v in batch.items()}))
    actual = pd.concat(parsed)
    for frame in (actual, expected):
        for column in ("island", "sex", "species"):
            frame[column] = frame[column].map(lambda v: v.decode() if isinstance(v, bytes) else v)
    key = list(expected.columns)
    actual = actual.sort_values(key).reset_index(drop=True)[key]
    expected = expected.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(actual, expected, check_dtype=False)


def test_manifest_has_counts_schema_and_checksums(penguins_pipeline):
    manifest = read_json(penguins_pipeline.shard.manifest_uri)
    base = penguins_pipeline.layout.shards
    assert [c["name"] for c in manifest["columns"]][-1] == "species"
    assert manifest["compression"] == "GZIP"
    for split in manifest["splits"].values():
        assert split["records"] == sum(s["records"] for s in split["shards"])
        for shard in split["shards"]:
            assert shard["file"].split("/")[1].startswith("part-0000")
            assert sha256_file(f"{base}/{shard['file']}") == shard["sha256"]
            assert sum(1 for _ in tf.data.TFRecordDataset(f"{base}/{shard['file']}", "GZIP")) == shard["records"]


def test_resharding_gives_identical_bytes(penguins_pipeline, tmp_path):
    run = penguins_pipeline
    again = shard_dataset(run.spec, run.layout.validated, str(tmp_path / "shards"))
    first, second = read_json(run.shard.manifest_uri), read_json(again.manifest_uri)
    assert first == second
    assert again.rewritten


def test_shards_are_the_same_bytes_however_many_processes_write_them(penguins_pipeline, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    run = penguins_pipeline
    validated = tmp_path / "validated"
    validated.mkdir()
    pq.write_table(pq.read_table(run.validate.data_uri), validated / "data.parquet", row_group_size=40)  # 9 groups
    report = read_json(f"{run.layout.validated}/report.json")
    write_json(str(validated / "report.json"), {**report, "data_sha256": sha256_file(validated / "data.parquet")})

    one = read_json(shard_dataset(run.spec, str(validated), str(tmp_path / "one"), processes=1).manifest_uri)
    three = read_json(shard_dataset(run.spec, str(validated), str(tmp_path / "three"), processes=3).manifest_uri)
    assert one["splits"] == three["splits"]  # same files: names, counts, sizes and SHA-256
    monkeypatch.setattr("tfjobs.shard.BATCH_ROWS", 50)  # batches that cut row groups: still the same bytes
    small = read_json(shard_dataset(run.spec, str(validated), str(tmp_path / "small"), processes=1).manifest_uri)
    assert small["splits"] == one["splits"]
    assert sorted(p.name for p in (tmp_path / "three").rglob("*.part*")) == []
    # Written in row-group parts, the records are those of the shards written from one row group, in order.
    whole = read_json(run.shard.manifest_uri)
    for split in ("train", "eval", "test"):
        for parts, single in zip(three["splits"][split]["shards"], whole["splits"][split]["shards"]):
            read = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "three" / parts["file"]), "GZIP")]
            expected = [r.numpy() for r in tf.data.TFRecordDataset(f"{run.layout.shards}/{single['file']}", "GZIP")]
            assert read == expected and len(read) == parts["records"]


def test_split_does_not_depend_on_row_order(penguins_spec):
    from tfjobs.shard import split_assignment

    frame = palmerpenguins.load_penguins().fillna(0)
    split, _ = split_assignment(penguins_spec, frame)
    shuffled = frame.sample(frac=1.0, random_state=3)
    split_shuffled, _ = split_assignment(penguins_spec, shuffled)
    np.testing.assert_array_equal(split_shuffled, split[shuffled.index.to_numpy()])


def test_shard_needs_validated_data(penguins_spec, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the validate step first"):
        shard_dataset(penguins_spec, str(tmp_path / "validated"), str(tmp_path / "shards"))
