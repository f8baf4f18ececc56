"""The S3 object store and the streamed input pipeline, against a real S3 endpoint on loopback."""

import json
import re
import traceback

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, tiny_spec
from s3_server import FaultyProxy, moto_s3
from tfjobs.storage import s3
from tfjobs.fetch import fetch_dataset
from tfjobs.storage.input_pipeline import ChecksumMismatchError, open_shards, raw_batches
from tfjobs.shard import shard_dataset
from tfjobs.storage.store import LocalStore, join, read_json, store_for, write_json
from tfjobs.validate import validate_dataset


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(endpoint):
    s3.configure(lambda: endpoint.client(), source="the test endpoint")
    yield f"s3://{endpoint.bucket}"
    s3.configure()


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    """5,000 synthetic rows in 16 + 2 + 2 shards, made locally."""
    tmp = tmp_path_factory.mktemp("synthetic")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "size": rng.normal(size=5000).round(3), "colour": rng.choice(["red", "blue", ""], 5000),
        "batch": rng.integers(0, 9, 5000), "kind": rng.choice(["a", "b"], 5000),
    })
    frame.to_csv(tmp / "in.csv", index=False)
    spec = tiny_spec(shards={"train": 16, "eval": 2, "test": 2})
    fetch_dataset(spec, str(tmp / "raw"), source_uri=str(tmp / "in.csv"))
    validate_dataset(spec, str(tmp / "raw"), str(tmp / "validated"))
    shard_dataset(spec, str(tmp / "validated"), str(tmp / "shards"))
    return tmp / "shards"


def upload_shards(local_shards, uri):
    store_for(uri).publish_dir(local_shards, uri, last=["manifest.json"])
    return join(uri, "manifest.json")


def read_all(manifest_uri, **options):
    with open_shards(manifest_uri, "train", **options) as shards:
        batches = [b["size"].numpy() for b in raw_batches(shards, 500)]
        return shards, np.concatenate(batches)


def test_objects_round_trip(bucket):
    store = store_for(bucket)
    write_json(f"{bucket}/t/a.json", {"x": 1})
    store.write_bytes(f"{bucket}/t/sub/b", b"bytes")
    assert read_json(f"{bucket}/t/a.json") == {"x": 1}
    assert store.list(f"{bucket}/t") == [f"{bucket}/t/a.json", f"{bucket}/t/sub/b"]
    assert store.exists(f"{bucket}/t/a.json") and not store.exists(f"{bucket}/t/zzz")
    store.delete(f"{bucket}/t/sub")
    assert store.list(f"{bucket}/t") == [f"{bucket}/t/a.json"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.read_bytes(f"{bucket}/t/zzz")


def test_publish_dir_puts_markers_last_and_removes_stale_objects(bucket, tmp_path, monkeypatch):
    store = store_for(bucket)
    target = f"{bucket}/publish"
    store.write_bytes(f"{target}/stale", b"old")
    store.write_bytes(f"{target}/saved_model.pb", b"old marker")
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "v").write_bytes(b"v")
    (tmp_path / "saved_model.pb").write_bytes(b"new marker")
    events = []
    original_upload, original_delete = s3.S3Store.upload, s3.S3Store.delete
    monkeypatch.setattr(s3.S3Store, "upload", lambda self, p, u: (events.append(("put", u)), original_upload(self, p, u)))
    monkeypatch.setattr(s3.S3Store, "delete", lambda self, u: (events.append(("del", u)), original_delete(self, u)))
    store.publish_dir(tmp_path, target, last=["saved_model.pb"])
    assert events == [
        ("del", f"{target}/saved_model.pb"),
        ("put", f"{target}/variables/v"),
        ("del", f"{target}/stale"),
        ("put", f"{target}/saved_model.pb"),
    ]
    assert store.read_bytes(f"{target}/saved_model.pb") == b"new marker"


def test_failed_publish_leaves_nothing_that_looks_complete(bucket, tmp_path, monkeypatch):
    for name in ("a", "b", "saved_model.pb"):
        (tmp_path / name).write_bytes(name.encode())
    original_upload = s3.S3Store.upload

    def flaky_upload(self, path, uri):
        if uri.endswith("/b"):
            raise s3.ObjectStoreError("connection reset")
        original_upload(self, path, uri)

    monkeypatch.setattr(s3.S3Store, "upload", flaky_upload)
    with pytest.raises(s3.ObjectStoreError):
        store_for(bucket).publish_dir(tmp_path, f"{bucket}/serving/m/7", last=["saved_model.pb"])
    assert store_for(bucket).list(f"{bucket}/serving/m/7") == []


def test_unknown_bucket_and_wrong_credentials_are_named_without_secrets(endpoint):
    from botocore.exceptions import ClientError

    s3.configure(lambda: endpoint.client(), source="Airflow connection 'shardline_store'")
    with pytest.raises(s3.ObjectStoreAccessError, match="bucket 'no-such-bucket' does not exist "
                       r"\(S3 answered NoSuchBucket: The specified bucket does not exist; .*'shardline_store'"):
        store_for("s3://no-such-bucket/x").read_bytes("s3://no-such-bucket/x")
    s3.configure(lambda: endpoint.client(secret_key="wrong-secret-123"), source="Airflow connection 'typo'")
    with pytest.raises(s3.ObjectStoreAccessError, match="denied .S3 answered SignatureDoesNotMatch: The request signature "
                       "we calculated does not match.*check the credentials in Airflow connection 'typo'") as info:
        store_for("s3://shardline/x").write_bytes("s3://shardline/x", b"x")
    assert isinstance(info.value.__cause__, ClientError)  # the botocore error stays attached
    logged = "".join(traceback.format_exception(info.value))  # what a task log shows: the whole chain
    assert endpoint.secret_key not in logged and "wrong-secret-123" not in logged
    s3.configure()


@pytest.mark.parametrize("mode", ["stage", "stream"])
def test_shards_read_from_s3_equal_local_reads(bucket, local_shards, mode):
    manifest = upload_shards(local_shards, f"{bucket}/read-{mode}")
    _, local = read_all(str(local_shards / "manifest.json"))
    shards, remote = read_all(manifest, mode=mode)
    assert shards.mode == mode
    np.testing.assert_array_equal(remote, local)
    with open_shards(str(local_shards / "manifest.json"), "train") as here, open_shards(manifest, "train", mode=mode) as there:
        assert raw_batches(there, 64).element_spec == raw_batches(here, 64).element_spec


def test_streaming_cache_stays_bounded_and_is_emptied(bucket, local_shards):
    manifest = upload_shards(local_shards, f"{bucket}/bounded")
    sizes = [s["bytes"] for s in read_json(manifest)["splits"]["train"]["shards"]]
    limit = 8 * max(sizes)  # room for an interleave cycle of 2 files
    with open_shards(manifest, "train", mode="stream", cache_limit_bytes=limit, workers=4) as shards:
        assert shards.cycle == 2
        stream = shards._stream
        for epoch in range(2):  # a second epoch downloads again, in a new order when shuffled
            count = sum(1 for _ in shards.record_dataset(shuffle=True, seed=epoch))
            assert count == shards.records
            assert list(stream.cache_dir.iterdir()) == []
            assert stream.cached_bytes == 0
        assert stream.peak_bytes <= limit + max(sizes) < sum(sizes)


def test_a_corrupt_shard_is_detected(bucket, local_shards):
    manifest = upload_shards(local_shards, f"{bucket}/corrupt")
    first = join(f"{bucket}/corrupt", read_json(manifest)["splits"]["train"]["shards"][0]["file"])
    store_for(first).write_bytes(first, b"not the shard you are looking for")
    with pytest.raises(ChecksumMismatchError, match="does not match the SHA-256"):
        with open_shards(manifest, "train", mode="stage"):
            pass


def test_retries_absorb_throttling_and_dropped_connections(endpoint, bucket, tmp_path):
    with FaultyProxy(endpoint.url, share=0.3, seed=4) as proxy:
        s3.configure(lambda: endpoint.client(url=proxy.url), source="proxy")
        payloads = {f"{bucket}/faults/{i}": bytes([i]) * (1000 + i) for i in range(30)}
        for uri, data in payloads.items():
            store_for(uri).write_bytes(uri, data)
        assert all(store_for(uri).read_bytes(uri) == data for uri, data in payloads.items())
        assert sum(proxy.injected.values()) >= 5 and len(proxy.injected) >= 3


def test_operators_take_credentials_from_the_airflow_connection(endpoint, monkeypatch, tmp_path):
    from airflow.sdk.exceptions import AirflowFailException

    from operators import FetchDatasetOperator
    from test_operators import context

    monkeypatch.setenv("AIRFLOW_CONN_SHARDLINE_STORE", endpoint.airflow_connection())
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    spec = ROOT / "include" / "penguins.yaml"
    operator = FetchDatasetOperator(task_id="fetch", spec=spec, store_uri="s3://shardline/ops", partition="2026-11-25")
    result = operator.execute(context())
    assert result["rows"] == 344 and result["manifest_uri"] == "s3://shardline/ops/raw/penguins/2026-11-25/manifest.json"
    assert endpoint.secret_key not in json.dumps(result)
    assert endpoint.secret_key not in json.dumps(read_json(result["manifest_uri"]))

    monkeypatch.setenv("AIRFLOW_CONN_TYPO", json.dumps({**json.loads(endpoint.airflow_connection()), "password": "nope"}))
    bad = FetchDatasetOperator(task_id="fetch", spec=spec, store_uri="s3://shardline/ops", partition="2026-11-26",
                               store_conn_id="typo")
    with pytest.raises(AirflowFailException, match="Airflow connection 'typo'") as info:
        bad.execute(context())
    assert "nope" not in str(info.value)
    missing = FetchDatasetOperator(task_id="fetch", spec=spec, store_uri="s3://missing-bucket/x", partition="2026-11-26")
    with pytest.raises(AirflowFailException, match="bucket 'missing-bucket' does not exist"):
        missing.execute(context())
    s3.configure()


def refusing_deletes(endpoint, bucket: str, keys: str):
    """A client of a new bucket whose policy denies s3:DeleteObject on ``keys`` (a pattern)."""
    client = endpoint.client()
    client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": f"arn:aws:s3:::{bucket}/{keys}",
    }]}))
    return client


def test_a_refused_delete_fails_the_step_naming_the_key_and_the_cause(endpoint, tmp_path):
    """S3 answers DeleteObjects with HTTP 200 and per-key Errors: here a bucket policy denies one key."""
    client = refusing_deletes(endpoint, "guarded", "raw/*/manifest.json")
    s3.configure(lambda: client, source="Airflow connection 'guarded_store'")
    spec = tiny_spec()
    (tmp_path / "first.csv").write_text("size,colour,batch,kind\n1.0,red,1,a\n")
    (tmp_path / "second.csv").write_text("size,colour,batch,kind\n2.0,blue,2,b\n")
    output = "s3://guarded/raw/tiny/2026-11-25"
    try:
        fetch_dataset(spec, output, source_uri=str(tmp_path / "first.csv"))
        with pytest.raises(s3.ObjectStoreAccessError, match=re.escape(
            f"Cannot delete {output}/manifest.json: S3 refused {output}/manifest.json: AccessDenied: Access Denied; "
            "the credentials in Airflow connection 'guarded_store' need s3:DeleteObject"
        )):
            fetch_dataset(spec, output, source_uri=str(tmp_path / "second.csv"))  # a changed source: manifest out first
        store = store_for(output)
        with pytest.raises(s3.ObjectStoreAccessError, match=r"S3 refused s3://guarded/raw/tiny/2026-11-25/manifest"):
            store.delete("s3://guarded/raw")
        assert store.list("s3://guarded/raw") == [f"{output}/manifest.json"]  # the rest went
    finally:
        s3.configure()


def test_keys_that_fail_to_delete_transiently_are_deleted_again(endpoint, bucket, monkeypatch):
    store = store_for(bucket)
    for name in ("a", "b", "c"):
        store.write_bytes(f"{bucket}/flaky-delete/{name}", b"x")
    client = s3.client()
    real_delete_objects = client.delete_objects
    answers = []

    def once_internal_error_for_b(**kwargs):
        objects = kwargs["Delete"]["Objects"]
        if not answers and {"Key": "flaky-delete/b"} in objects:
            kwargs["Delete"]["Objects"] = [o for o in objects if o["Key"] != "flaky-delete/b"]
            error = {"Key": "flaky-delete/b", "Code": "InternalError", "Message": "We encountered an internal error."}
            answer = {**real_delete_objects(**kwargs), "Errors": [error]}
        else:
            answer = real_delete_objects(**kwargs)
        answers.append(answer)
        return answer

    monkeypatch.setattr(client, "delete_objects", once_internal_error_for_b)
    store.delete(f"{bucket}/flaky-delete")
    assert store.list(f"{bucket}/flaky-delete") == [] and len(answers) == 2


def test_local_store_is_untouched_by_s3_configuration(tmp_path):
    assert isinstance(store_for(str(tmp_path)), LocalStore)
