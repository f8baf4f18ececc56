"""The S3 object store and the streamed input pipeline, against a real S3 endpoint on loopback."""

import json
import queue
import re
import threading
import time
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
from tfjobs.storage.store import LocalStore, StagingCleanupError, join, read_json, store_for, write_json
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


def record_calls(monkeypatch, events):
    """Record (method, destination URI) for every upload, copy and delete of the S3 store."""
    for name in ("upload", "copy", "delete"):
        original = getattr(s3.S3Store, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            events.append((_name, args[0] if _name == "delete" else args[1]))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(s3.S3Store, name, recorded)


def old_version_and_new_files(store, target, tmp_path):
    store.write_bytes(f"{target}/stale", b"old")
    store.write_bytes(f"{target}/saved_model.pb", b"old marker")
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "v").write_bytes(b"v")
    (tmp_path / "saved_model.pb").write_bytes(b"new marker")


def test_staged_publish_uploads_beside_the_target_and_copies_in_the_marker_last(bucket, tmp_path, monkeypatch):
    store = store_for(bucket)
    target = f"{bucket}/publish/7"
    old_version_and_new_files(store, target, tmp_path)
    events = []
    record_calls(monkeypatch, events)
    store.publish_dir(tmp_path, target, last=["saved_model.pb"])
    staging = events[-1][1]
    assert re.fullmatch(rf"{bucket}/publish/\.staging-7-[0-9a-f]+", staging)
    assert sorted(events[:2]) == [("upload", f"{staging}/saved_model.pb"), ("upload", f"{staging}/variables/v")]
    assert events[2:] == [
        ("delete", f"{target}/saved_model.pb"),
        ("copy", f"{target}/variables/v"),
        ("delete", f"{target}/stale"),
        ("copy", f"{target}/saved_model.pb"),
        ("delete", staging),
    ]
    assert store.list(f"{bucket}/publish") == [f"{target}/saved_model.pb", f"{target}/variables/v"]
    assert store.read_bytes(f"{target}/saved_model.pb") == b"new marker"


def test_unstaged_publish_uploads_in_place_markers_last(bucket, tmp_path, monkeypatch):
    store = store_for(bucket)
    target = f"{bucket}/in-place"
    old_version_and_new_files(store, target, tmp_path)
    events = []
    record_calls(monkeypatch, events)
    store.publish_dir(tmp_path, target, last=["saved_model.pb"], staged=False)
    assert events == [
        ("delete", f"{target}/saved_model.pb"),
        ("upload", f"{target}/variables/v"),
        ("delete", f"{target}/stale"),
        ("upload", f"{target}/saved_model.pb"),
    ]
    assert store.read_bytes(f"{target}/saved_model.pb") == b"new marker"


@pytest.mark.parametrize("failing", ["upload", "copy"])
def test_failed_publish_leaves_neither_a_partial_version_nor_its_staging_copy(bucket, tmp_path, monkeypatch, failing):
    for name in ("a", "b", "saved_model.pb"):
        (tmp_path / name).write_bytes(name.encode())
    original = getattr(s3.S3Store, failing)

    def flaky(self, source, destination, **kwargs):
        if destination.endswith("/b"):
            raise s3.ObjectStoreError("connection reset")
        original(self, source, destination, **kwargs)

    monkeypatch.setattr(s3.S3Store, failing, flaky)
    with pytest.raises(s3.ObjectStoreError, match="connection reset"):
        store_for(bucket).publish_dir(tmp_path, f"{bucket}/failing-{failing}/m/7", last=["saved_model.pb"])
    assert store_for(bucket).list(f"{bucket}/failing-{failing}") == []


def test_files_above_the_multipart_threshold_are_copied_in_parts(endpoint, tmp_path, monkeypatch):
    operations = []
    client = endpoint.client()
    client.meta.events.register("before-call.s3", lambda model, **_: operations.append(model.name))
    s3.configure(lambda: client, source="the test endpoint")
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 << 20)
    big = np.random.default_rng(0).bytes(12 << 20)
    (tmp_path / "variables.data").write_bytes(big)
    (tmp_path / "saved_model.pb").write_bytes(b"marker")
    target = "s3://shardline/big/1"
    try:
        store_for(target).publish_dir(tmp_path, target, last=["saved_model.pb"])
        assert store_for(target).read_bytes(f"{target}/variables.data") == big
    finally:
        s3.configure()
    assert operations.count("UploadPartCopy") == 2 and operations.count("CopyObject") == 1


def tf_serving_versions(listing: list[str], model_uri: str) -> dict[int, set[str]]:
    """What TF Serving takes for versions in a listing: children whose name parses as an int64."""
    versions: dict[int, set[str]] = {}
    for uri in listing:
        child, _, rest = uri[len(model_uri) + 1 :].partition("/")
        if re.fullmatch(r"\s*[-+]?\d+\s*", child):
            versions.setdefault(int(child), set()).add(rest)
    return versions


class PausedCalls:
    """Holds every call of a wrapped store method until the test releases it."""

    def __init__(self):
        self.waiting = queue.Queue()

    def wrap(self, method, action):
        def paused(store, source, destination, **kwargs):
            release = threading.Event()
            self.waiting.put((action, destination, release))
            if not release.wait(120):
                raise TimeoutError(f"the test never released {action} {destination}")
            return method(store, source, destination, **kwargs)

        return paused


def test_tf_serving_never_sees_an_incomplete_version_while_an_export_uploads(bucket, penguins_pipeline, monkeypatch):
    """Pause an export at each upload and copy, list the model directory over HTTP each time."""
    from tfjobs.export import ExportArgs, export_model

    run = penguins_pipeline
    model_uri = f"{bucket}/paused/serving/penguins"
    store = store_for(model_uri)
    store.write_bytes(f"{model_uri}/1/saved_model.pb", b"an older, complete version")
    calls = PausedCalls()
    monkeypatch.setattr(s3.S3Store, "upload", calls.wrap(s3.S3Store.upload, "upload"))
    monkeypatch.setattr(s3.S3Store, "copy", calls.wrap(s3.S3Store.copy, "copy"))
    outcome = {}

    def export():
        try:
            outcome["result"] = export_model(ExportArgs(run.spec, run.train.model_uri, run.adapt.state_uri,
                                                        run.shard.manifest_uri, run.evaluate.metrics_uri, model_uri,
                                                        run.export.version))
        except BaseException as err:
            outcome["error"] = err

    exporting = threading.Thread(target=export)
    exporting.start()
    seen = []  # (action about to run, its destination, TF Serving's view of the model directory)
    deadline = time.monotonic() + 300
    while exporting.is_alive() or not calls.waiting.empty():
        assert time.monotonic() < deadline, "the export did not finish"
        try:
            action, destination, release = calls.waiting.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append((action, destination, tf_serving_versions(store.list(model_uri), model_uri)))
        release.set()
    exporting.join()
    if "error" in outcome:
        raise outcome["error"]

    version = outcome["result"].version
    complete = tf_serving_versions(store.list(model_uri), model_uri)
    assert set(complete) == {1, version} and "saved_model.pb" in complete[version]
    assert {"variables/variables.index", "variables/variables.data-00000-of-00001"} <= complete[version]
    uploads = [versions for action, _, versions in seen if action == "upload"]
    copies = [(destination, versions) for action, destination, versions in seen if action == "copy"]
    for versions in uploads:  # the uploads take the time; meanwhile only complete versions are in sight
        assert versions == {1: {"saved_model.pb"}}
    for destination, versions in copies:  # the copies into <version>/ land saved_model.pb last
        assert "saved_model.pb" not in versions.get(version, set())
    assert len(uploads) == len(copies) == len(complete[version])
    assert copies[-1][0].endswith(f"/{version}/saved_model.pb")
    assert copies[-1][1][version] == complete[version] - {"saved_model.pb"}


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


def test_the_connections_config_kwargs_merge_over_the_project_defaults(endpoint, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    from operators.base import use_store_connection

    def connection_with(config_kwargs):
        conn = json.loads(endpoint.airflow_connection())
        conn["extra"]["config_kwargs"] = config_kwargs
        return json.dumps(conn)

    monkeypatch.setenv("AIRFLOW_CONN_PATH_STYLE", connection_with(
        {"signature_version": "s3v4", "s3": {"addressing_style": "path"}}))
    monkeypatch.setenv("AIRFLOW_CONN_FEW_RETRIES", connection_with({"retries": {"max_attempts": 2}, "read_timeout": 5}))
    try:
        use_store_connection("s3://shardline/x", "path_style")
        config = s3.client().meta.config
        assert (config.signature_version, config.s3) == ("s3v4", {"addressing_style": "path"})
        assert config.retries == {"mode": "standard", "total_max_attempts": s3.MAX_ATTEMPTS + 1}
        assert (config.connect_timeout, config.read_timeout, config.request_checksum_calculation) == (
            10, 60, "when_supported")
        store_for("s3://shardline/x").write_bytes("s3://shardline/x/path-style", b"through the connection")

        use_store_connection("s3://shardline/x", "few_retries")
        config = s3.client().meta.config
        assert config.retries == {"mode": "standard", "total_max_attempts": 3}  # the user's attempts, our mode
        assert (config.connect_timeout, config.read_timeout) == (10, 5)

        monkeypatch.setenv("AIRFLOW_CONN_TYPO", connection_with({"retry": {"max_attempts": 3}}))
        with pytest.raises(AirflowFailException, match="Airflow connection 'typo': config_kwargs in its extra are not "
                           "botocore Config options .*'retry'"):
            use_store_connection("s3://shardline/x", "typo")
    finally:
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


def test_a_staging_copy_that_cannot_be_deleted_fails_the_publish_and_says_the_version_is_complete(endpoint, tmp_path):
    client = refusing_deletes(endpoint, "no-cleanup", "serving/m/.staging-*")
    s3.configure(lambda: client, source="the test endpoint")
    (tmp_path / "saved_model.pb").write_bytes(b"marker")
    try:
        with pytest.raises(StagingCleanupError, match=r"s3://no-cleanup/serving/m/7 is published and complete, but "
                           r"its staging copy s3://no-cleanup/serving/m/\.staging-7-\w+ could not be removed: "
                           r".*AccessDenied"):
            store_for("s3://no-cleanup").publish_dir(tmp_path, "s3://no-cleanup/serving/m/7", last=["saved_model.pb"])
        assert store_for("s3://no-cleanup").read_bytes("s3://no-cleanup/serving/m/7/saved_model.pb") == b"marker"
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


def test_conditional_writes_over_http_create_once_and_swap_only_the_etag_they_read(bucket):
    """moto answers If-None-Match: * and If-Match on PutObject with 412 PreconditionFailed, as S3 does."""
    from test_store import check_conditional_writes

    check_conditional_writes(store_for(bucket), f"{bucket}/conditional/production.json",
                             f"{bucket}/conditional/nothing", lost="S3 answered PreconditionFailed")


def test_a_conditional_put_whose_answer_was_lost_is_not_reported_as_lost(endpoint, bucket):
    """botocore retries a PUT whose answer was dropped; the retry fails its condition though the first try won."""
    from botocore.exceptions import ClientError

    from tfjobs.storage.store import PreconditionFailedError

    real = endpoint.client()

    class AnswerLost:  # the PUT takes effect, then the client sees 412 (what the retry of a dropped answer gets)
        def __getattr__(self, name):
            return getattr(real, name)

        def put_object(self, **kwargs):
            real.put_object(**kwargs)
            raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "retried"}}, "PutObject")

    s3.configure(lambda: AnswerLost(), source="the test endpoint")
    store, uri = store_for(bucket), f"{bucket}/lost-answer/claim"
    token = store.write_conditional(uri, b"mine", if_absent=True)
    assert store.read_versioned(uri) == (b"mine", token)
    with pytest.raises(PreconditionFailedError):  # another writer's bytes: a real loss
        store.write_conditional(uri, b"someone else's", if_absent=True)


def two_models(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "variables").mkdir(parents=True)
        for file in ("saved_model.pb", "variables/data", "shardline.json"):
            (tmp_path / name / file).write_text(f"{name}:{file}")
    return tmp_path / "a", tmp_path / "b"


def test_exclusive_publishes_racing_for_one_version_over_http_leave_one_whole(bucket, tmp_path):
    """Two runs publish different models as one version at once: the claim lets exactly one in, the other is
    refused before it copies anything, and the winner's files are whole."""
    from tfjobs.storage.store import AlreadyPublishedError, claim_uri

    store = store_for(bucket)
    models = dict(zip("ab", two_models(tmp_path)))
    for attempt in range(4):
        target = f"{bucket}/race/serving/m/{attempt + 1}"
        barrier, outcomes = threading.Barrier(2), {}

        def publish(name):
            barrier.wait()
            try:
                store.publish_dir(models[name], target, last=["saved_model.pb"], exclusive=True,
                                  owner=f"weights-{name}")
                outcomes[name] = "published"
            except AlreadyPublishedError as err:
                outcomes[name] = str(err)

        threads = [threading.Thread(target=publish, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(outcomes) == 2 and list(outcomes.values()).count("published") == 1, outcomes
        winner, loser = sorted(outcomes, key=lambda name: outcomes[name] != "published")
        assert re.search(rf"{target} (is claimed by another publisher|was published by another run)", outcomes[loser])
        names = {uri[len(target) + 1:]: store.read_bytes(uri).decode() for uri in store.list(target)}
        assert names == {f: f"{winner}:{f}" for f in ("saved_model.pb", "variables/data", "shardline.json")}
        assert not store.exists(claim_uri(target))  # published: the markers keep others out from here on
    leftovers = [u for u in store.list(f"{bucket}/race") if "/.staging-" in u or "/.claims/" in u]
    assert leftovers == []


def test_a_killed_publish_is_taken_over_by_its_own_retry_and_kept_from_other_models(bucket, tmp_path):
    """A run killed mid-copy leaves its claim and part of its files: a retry of the same model (same owner)
    replaces them, another model is refused that version."""
    from tfjobs.export import claimed_versions
    from tfjobs.storage.store import AlreadyPublishedError, claim_uri

    store = store_for(bucket)
    a, b = two_models(tmp_path)
    serving = f"{bucket}/killed/serving/m"
    target = f"{serving}/86400"
    store.claim(target, owner="weights-a")  # what the killed run did first
    store.write_bytes(f"{target}/variables/data", b"half of a's copy")
    assert claimed_versions(serving, 86_400, 2 * 86_400, owner="weights-b") == {86_400}
    assert claimed_versions(serving, 86_400, 2 * 86_400, owner="weights-a") == set()
    with pytest.raises(AlreadyPublishedError, match=rf"{target} is claimed by another publisher \(owner weights-a"):
        store.publish_dir(b, target, last=["saved_model.pb"], exclusive=True, owner="weights-b")
    assert store.read_bytes(f"{target}/variables/data") == b"half of a's copy"  # the refused run touched nothing
    store.publish_dir(a, target, last=["saved_model.pb"], exclusive=True, owner="weights-a")
    assert {u[len(target) + 1:] for u in store.list(target)} == {"saved_model.pb", "variables/data", "shardline.json"}
    assert store.read_bytes(f"{target}/variables/data") == b"a:variables/data"
    assert not store.exists(claim_uri(target))


def test_a_retry_that_lost_its_claim_to_another_retry_stops_before_its_markers(bucket, tmp_path, monkeypatch):
    """Two retries of one model: the one whose claim was taken over while it copied leaves the version alone."""
    from tfjobs.storage.store import ClaimLostError, ObjectStore, claim_uri

    store = store_for(bucket)
    a, _ = two_models(tmp_path)
    target = f"{bucket}/takeover/serving/m/5"
    real_replace = ObjectStore._replace_dir

    def taken_over_midway(self, uri, files, last, put, before_markers=lambda: None):
        def other_retry_claims_then_check():
            self.claim(uri, owner="weights-a")  # the other retry takes the claim over here
            before_markers()
        return real_replace(self, uri, files, last, put, other_retry_claims_then_check)

    monkeypatch.setattr(ObjectStore, "_replace_dir", taken_over_midway)
    with pytest.raises(ClaimLostError, match=rf"{target} was taken over by another run of the same model"):
        store.publish_dir(a, target, last=["saved_model.pb"], exclusive=True, owner="weights-a")
    assert not store.exists(f"{target}/saved_model.pb")  # no marker: the other retry finishes the version
    assert store.exists(f"{target}/variables/data")  # and its files were not deleted under it
    assert store.exists(claim_uri(target))
    assert not [u for u in store.list(f"{bucket}/takeover") if "/.staging-" in u]


def test_a_retry_that_fails_after_its_claim_was_taken_over_deletes_nothing_of_the_other_retrys(
        bucket, tmp_path, monkeypatch):
    """Whatever a publish fails on (here a dropped connection mid-copy), once another retry of the same model
    has taken its claim over, the version directory is the other's: the failed one must not delete the files
    the other has copied, or the other's markers would land over a directory with files missing."""
    from tfjobs.storage.store import claim_uri

    store = store_for(bucket)
    a, _ = two_models(tmp_path)
    target = f"{bucket}/takeover-fail/serving/m/5"

    once = threading.Lock()

    def dropped_after_the_other_retry_took_over(self, source, destination, **kwargs):
        if once.acquire(blocking=False):  # (the copies run in threads: the first one does this)
            self.claim(target, owner="weights-a")  # the other retry takes the claim over
            self.write_bytes(f"{target}/variables/data", b"the other retry's copy")  # and copies a file
        raise ConnectionError("connection dropped")

    monkeypatch.setattr(type(store), "copy", dropped_after_the_other_retry_took_over)
    with pytest.raises(ConnectionError):
        store.publish_dir(a, target, last=["saved_model.pb"], exclusive=True, owner="weights-a")
    assert store.read_bytes(f"{target}/variables/data") == b"the other retry's copy"
    assert store.exists(claim_uri(target))  # the other retry's claim
    assert not [u for u in store.list(f"{bucket}/takeover-fail") if "/.staging-" in u]


def test_two_exports_of_different_models_racing_for_one_version_on_s3(bucket, penguins_pipeline, monkeypatch):
    """A manual trigger and the scheduled run export different models for the same date at once: both pick the
    same version, the claim lets one publish, the other fails saying so, and its retry takes the next version."""
    from tfjobs import export as export_module
    from tfjobs.export import ExportArgs, VersionTakenError, export_model
    from tfjobs.storage.store import ObjectStore

    run = penguins_pipeline
    serving = f"{bucket}/export-race/serving/penguins"
    args = ExportArgs(run.spec, run.train.model_uri, run.adapt.state_uri, run.shard.manifest_uri,
                      run.evaluate.metrics_uri, serving, run.export.version)
    fingerprint = export_module.weights_fingerprint  # each thread exports "another model": its own fingerprint
    monkeypatch.setattr(export_module, "weights_fingerprint",
                        lambda model: f"{threading.current_thread().name}-{fingerprint(model)}")
    barrier, claim = threading.Barrier(2), ObjectStore.claim

    def claim_together(self, uri, owner=""):  # both have chosen their version before either claims it
        barrier.wait(timeout=300)
        return claim(self, uri, owner)

    monkeypatch.setattr(ObjectStore, "claim", claim_together)
    outcomes = {}

    def export(name):
        try:
            outcomes[name] = export_model(args)
        except VersionTakenError as err:
            outcomes[name] = err

    threads = [threading.Thread(target=export, args=(name,), name=name) for name in ("manual", "scheduled")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = {name: o for name, o in outcomes.items() if isinstance(o, VersionTakenError)}
    won = {name: o for name, o in outcomes.items() if not isinstance(o, VersionTakenError)}
    assert len(lost) == len(won) == 1, outcomes
    (winner, result), (loser, error) = next(iter(won.items())), next(iter(lost.items()))
    assert result.version == args.version
    assert re.search(rf"Version {args.version} under {serving} was taken by another run while this one exported "
                     r"\(.*(is claimed by another publisher|was published by another run)", str(error))
    metadata = read_json(f"{serving}/{args.version}/shardline.json")
    assert metadata["weights_sha256"].startswith(f"{winner}-")  # the winner's files, whole
    assert {"saved_model.pb", "variables/variables.index", "shardline.json"} <= {
        u[len(f"{serving}/{args.version}/"):] for u in store_for(serving).list(f"{serving}/{args.version}")}

    monkeypatch.setattr(ObjectStore, "claim", claim)
    retried = {}
    retry = threading.Thread(target=lambda: retried.update(result=export_model(args)), name=loser)
    retry.start()
    retry.join()
    assert retried["result"].version == args.version + 1  # the next free second of the day
    assert read_json(f"{serving}/{args.version}/shardline.json") == metadata  # the winner's version untouched
    assert not [u for u in store_for(serving).list(serving) if "/.claims/" in u or "/.staging-" in u]


def test_a_publish_removes_what_publishes_that_died_long_ago_left_and_nothing_recent(bucket, tmp_path, monkeypatch):
    """Killed publishes leave a staging prefix and a claim over a half-copied version; hours later they go."""
    from tfjobs.storage import store as store_module

    store = store_for(bucket)
    serving = f"{bucket}/reclaim/model"
    for key, data in {
        ".staging-5-dead/saved_model.pb": b"staged",  # a staging prefix of a publish killed mid-copy
        "5/variables/v": b"half",  # ... the version it had half copied, claimed
        ".claims/5": b'{"owner": "a"}',
        "6/saved_model.pb": b"done",  # a published version whose claim was not deleted
        "6/variables/v": b"done",
        ".claims/6": b'{"owner": "b"}',
    }.items():
        store.write_bytes(f"{serving}/{key}", data)
    time.sleep(3)
    store.write_bytes(f"{serving}/.staging-8-live/variables/v", b"a publish under way")
    store.write_bytes(f"{serving}/.claims/8", b'{"owner": "c"}')
    monkeypatch.setattr(store_module, "ABANDONED_AFTER_S", 2.0)
    (tmp_path / "variables").mkdir()
    (tmp_path / "variables" / "v").write_bytes(b"new")
    (tmp_path / "saved_model.pb").write_bytes(b"new")
    store.publish_dir(tmp_path, f"{serving}/7", last=["saved_model.pb"], exclusive=True, owner="d")
    left = {uri[len(serving) + 1 :] for uri in store.list(serving)}
    assert left == {"6/saved_model.pb", "6/variables/v", "7/saved_model.pb", "7/variables/v",
                    ".staging-8-live/variables/v", ".claims/8"}
