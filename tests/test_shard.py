from pathlib import Path

import numpy as np
import palmerpenguins
import pandas as pd
import pytest
import tensorflow as tf

from tfjobs.storage.input_pipeline import open_shards, raw_batches
from tfjobs.shard import _shard_names, shard_dataset
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
    # Written in row-group parts, the records are those of the shards written from one row group
    # (in another order: each row group's rows are shuffled among themselves).
    whole = read_json(run.shard.manifest_uri)
    for split in ("train", "eval", "test"):
        for parts, single in zip(three["splits"][split]["shards"], whole["splits"][split]["shards"]):
            read = [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "three" / parts["file"]), "GZIP")]
            expected = [r.numpy() for r in tf.data.TFRecordDataset(f"{run.layout.shards}/{single['file']}", "GZIP")]
            assert sorted(read) == sorted(expected) and len(read) == parts["records"]


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


LONG_SPEC = {
    "name": "long_values",
    "source": {"kind": "csv", "uri": "unused.csv"},
    "label": {"name": "price", "task": "regression"},
    "features": {"size": {"kind": "numeric"}, "tag": {"kind": "categorical"}, "text": {"kind": "categorical"}},
    "shards": {"train": 3, "eval": 1, "test": 1},
}


def write_long_values(directory, rows: int, row_group: int, cell_bytes: int = 16_384):
    """Validated data with a column of long strings, each different, and one ``cell_bytes`` long tag."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tfjobs.spec import parse_spec
    from tfjobs.validate import arrow_schema

    spec = parse_spec(LONG_SPEC)
    rng = np.random.default_rng(5)
    lengths = rng.integers(300, 3000, rows)
    alphabet = np.array([ord(c) for c in "abcdé xyz"], "<u4")
    letters = alphabet[rng.integers(0, len(alphabet), int(lengths.sum()))].tobytes().decode("utf-32-le")
    ends = np.cumsum(lengths).tolist()
    frame = pd.DataFrame({
        "size": rng.normal(size=rows).astype(np.float32),
        "tag": rng.choice(["red", "green", "blue"], rows).astype(object),
        "text": [letters[e - n : e] + str(i) for i, (e, n) in enumerate(zip(ends, lengths.tolist()))],
        "price": rng.gamma(2.0, 1e5, rows).astype(np.float32),
    })
    frame.loc[::7, "size"] = np.nan
    frame.loc[rows // 3, "tag"] = "t" * cell_bytes
    directory.mkdir(parents=True)
    table = pa.table({c: frame[c].to_numpy() for c in spec.columns}, schema=arrow_schema(spec))
    pq.write_table(table, directory / "data.parquet", row_group_size=row_group)
    write_json(str(directory / "report.json"), {
        "data_file": "data.parquet", "data_sha256": sha256_file(directory / "data.parquet"),
        "rows_in": rows, "rows_valid": rows, "rows_quarantined": 0, "reasons": {},
    })
    return spec, frame


def example_bytes(spec, row) -> bytes:
    """A ``tf.train.Example`` of ``row``, its features in the spec's order.

    A map's wire order is up to the serializer (upb's follows its hash table), so the Example is
    serialized a feature at a time: one-entry ``Features`` messages, concatenated, are one ``Features``.
    """
    features = {}
    for column in spec.record_columns():
        value = row[column.name]
        if column.dtype == "float32":
            features[column.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
        else:
            features[column.name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
    entries = b"".join(tf.train.Features(feature={name: feature}).SerializeToString()
                       for name, feature in features.items())
    size, length = bytearray(), len(entries)
    while length > 0x7F:
        size.append(length & 0x7F | 0x80)
        length >>= 7
    example = b"\x0a" + bytes(size) + bytes([length]) + entries
    assert tf.train.Example.FromString(example) == tf.train.Example(features=tf.train.Features(feature=features))
    return example


def test_long_values_shard_to_the_bytes_of_tf_train_examples(tmp_path, monkeypatch):
    """One 16 KiB cell and a column of long distinct strings: the records are exactly what per-row
    tf.train.Example + TFRecordWriter write, whatever the read batches, the byte budget and the processes."""
    import gzip

    from tfjobs.shard import shard_assignment

    spec, frame = write_long_values(tmp_path / "validated", rows=3000, row_group=1000)
    records = {name: [] for name in _shard_names(spec)}
    for start in range(0, 3000, 1000):  # each row group's rows go to their shards in shard order
        group = frame.iloc[start : start + 1000]
        shard, order = shard_assignment(spec, group)
        for row in np.argsort(order):
            records[_shard_names(spec)[shard[row]]].append(example_bytes(spec, group.iloc[row]))
    reference = {}
    for name, examples in records.items():
        path = tmp_path / "reference"
        with tf.io.TFRecordWriter(str(path)) as writer:
            for example in examples:
                writer.write(example)
        reference[name] = path.read_bytes()

    whole = read_json(shard_dataset(spec, str(tmp_path / "validated"), str(tmp_path / "whole"), 1).manifest_uri)
    # Batches of ~30 rows, padded matrices of ~8 rows: the 16 KiB cell is framed apart from the rest.
    monkeypatch.setattr("tfjobs.shard.GROUP_BYTES", 0)
    monkeypatch.setattr("tfjobs.shard.BATCH_BYTES", 50_000)
    monkeypatch.setattr("tfjobs.storage.tfrecord.CHUNK_BYTES", 20_000)
    cut = read_json(shard_dataset(spec, str(tmp_path / "validated"), str(tmp_path / "cut"), 2).manifest_uri)
    assert cut["splits"] == whole["splits"]
    for name, expected in reference.items():
        assert gzip.decompress((tmp_path / "cut" / name).read_bytes()) == expected, name
    assert sum(len(r) for r in reference.values()) > 3000 * 1600


_MEMORY_JOB = """
import json, sys
from tfjobs.shard import _shard_names, shard_dataset
from tfjobs.spec import parse_spec
import pyarrow.parquet, pandas

def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])

spec = parse_spec(json.loads(sys.argv[1]))
before = kib("VmRSS")
shard_dataset(spec, sys.argv[2], sys.argv[3], processes=1)
print(json.dumps({"growth_mib": (kib("VmHWM") - before) / 1024}))
"""


def test_shard_memory_follows_bytes_not_the_longest_value(tmp_path):
    """20,000 rows of ~1.6 KiB long distinct strings and one 16 KiB cell: before, the padded matrix was as
    wide as the 16 KiB cell for every row of a batch (>1 GiB); now memory follows the row groups' bytes."""
    import json
    import subprocess
    import sys

    write_long_values(tmp_path / "validated", rows=20_000, row_group=5_000)
    completed = subprocess.run(
        [sys.executable, "-c", _MEMORY_JOB, json.dumps(LONG_SPEC), str(tmp_path / "validated"), str(tmp_path / "out")],
        capture_output=True, text=True, check=True, env={"PYTHONPATH": str(Path(__file__).parents[1]),
                                                         "PATH": "/usr/bin:/bin"})
    growth = json.loads(completed.stdout.strip().splitlines()[-1])["growth_mib"]
    assert growth < 250, f"sharding 32 MiB of values took {growth:.0f} MiB more than the process had"


def test_a_label_sorted_input_is_read_shuffled_from_each_shard(penguins_pipeline, tmp_path):
    """Sorted by species, the input's first rows are all Adelie; a shard read front to back is not."""
    import dataclasses

    import pyarrow.parquet as pq

    run = penguins_pipeline
    validated = tmp_path / "validated"
    validated.mkdir()
    table = pq.read_table(run.validate.data_uri).sort_by("species")
    pq.write_table(table, validated / "data.parquet")
    report = read_json(f"{run.layout.validated}/report.json")
    write_json(str(validated / "report.json"), {**report, "data_sha256": sha256_file(validated / "data.parquet")})

    def first_train_records(spec, output):
        manifest = read_json(shard_dataset(spec, str(validated), str(tmp_path / output)).manifest_uri)
        path = tmp_path / output / manifest["splits"]["train"]["shards"][0]["file"]
        return [r.numpy() for r in tf.data.TFRecordDataset(str(path), "GZIP")]

    first = first_train_records(run.spec, "first")
    features = {"species": tf.io.FixedLenFeature([], tf.string)}
    species = tf.io.parse_example(first[:32], features)["species"].numpy()
    assert set(species) == {b"Adelie", b"Chinstrap", b"Gentoo"}, "the first batch holds every class"
    assert first_train_records(run.spec, "again") == first  # the same seed reads the same order
    reseeded = dataclasses.replace(run.spec, training=dataclasses.replace(run.spec.training, seed=7))
    other = first_train_records(reseeded, "other")
    assert other != first and sorted(other) == sorted(first)  # another seed: the same rows, another order
