from pathlib import Path

import pytest

from tfjobs.storage.store import LocalStore, join, local_copy, read_json, redact, store_for, write_json


def test_plain_paths_and_file_uris_address_the_same_object(tmp_path):
    uri = (tmp_path / "a" / "b.json").as_uri()
    write_json(uri, {"x": 1})
    assert read_json(str(tmp_path / "a" / "b.json")) == {"x": 1}
    assert store_for(uri).list(tmp_path.as_uri()) == [join(tmp_path.as_uri(), "a/b.json")]


def test_unknown_scheme_names_the_uri_without_credentials():
    with pytest.raises(ValueError, match=r"No object store for 'gs://bucket/x'.*supported schemes"):
        store_for("gs://user:secret@bucket/x")


def test_redact_drops_user_password_and_query():
    assert redact("https://bob:hunter2@example.com/data.csv?token=abc#x") == "https://example.com/data.csv"


def test_write_bytes_leaves_no_temporary_files(tmp_path):
    store = LocalStore()
    store.write_bytes(str(tmp_path / "f"), b"one")
    store.write_bytes(str(tmp_path / "f"), b"two")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    assert store.read_bytes(str(tmp_path / "f")) == b"two"


def test_publish_dir_replaces_the_whole_directory(tmp_path):
    store = LocalStore()
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "stale").write_text("stale")
    (new / "sub").mkdir(parents=True)
    (new / "sub" / "fresh").write_text("fresh")
    (new / "marker").write_text("done")
    target = str(tmp_path / "published")
    store.publish_dir(old, target)
    store.publish_dir(new, target, last=["marker"])
    assert store.list(target) == [join(target, "marker"), join(target, "sub/fresh")]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_publish_dir_requires_the_marker_to_exist(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    with pytest.raises(FileNotFoundError, match="saved_model.pb"):
        LocalStore().publish_dir(tmp_path / "src", str(tmp_path / "dst"), last=["saved_model.pb"])
    assert not (tmp_path / "dst").exists()


def test_local_copy_of_a_missing_object_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with local_copy(str(tmp_path / "nope.csv")):
            pass


def test_delete_removes_a_prefix(tmp_path):
    store = LocalStore()
    for name in ("p/a", "p/b/c", "q"):
        store.write_bytes(str(tmp_path / name), b"x")
    store.delete(str(tmp_path / "p"))
    assert store.list(str(tmp_path)) == [join(str(tmp_path), "q")]


def test_exclusive_publishes_racing_for_one_directory_leave_one_whole(tmp_path):
    """Two runs publish a version at the same moment: one wins whole, the other is refused, never a mix."""
    import threading

    from tfjobs.storage.store import AlreadyPublishedError

    store = LocalStore()
    for name in ("a", "b"):
        (tmp_path / name / "variables").mkdir(parents=True)
        for file in ("saved_model.pb", "variables/data"):
            (tmp_path / name / file).write_text(name)
    for attempt in range(20):
        target, barrier, outcomes = str(tmp_path / "serving" / str(attempt)), threading.Barrier(2), {}

        def publish(name):
            barrier.wait()
            try:
                store.publish_dir(tmp_path / name, target, last=["saved_model.pb"], exclusive=True)
                outcomes[name] = "published"
            except AlreadyPublishedError:
                outcomes[name] = "refused"

        threads = [threading.Thread(target=publish, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes.values()) == ["published", "refused"]
        winner = next(name for name, outcome in outcomes.items() if outcome == "published")
        assert {f: store.read_bytes(join(target, f)).decode() for f in ("saved_model.pb", "variables/data")} == {
            "saved_model.pb": winner, "variables/data": winner}
    assert [p.name for p in (tmp_path / "serving").iterdir() if p.name.startswith(".")] == []


def check_conditional_writes(store, uri: str, missing_uri: str, lost: str = "") -> None:
    """The contract of conditional writes, the same on every backend: create once, swap only what was read."""
    from tfjobs.storage.store import PreconditionFailedError

    assert store.read_versioned(uri) is None
    first = store.write_conditional(uri, b"one", if_absent=True)
    with pytest.raises(PreconditionFailedError, match=rf"{uri} exists .*{lost}"):
        store.write_conditional(uri, b"two", if_absent=True)
    assert store.read_versioned(uri) == (b"one", first)
    second = store.write_conditional(uri, b"two", if_match=first)
    assert second != first and store.read_bytes(uri) == b"two"
    with pytest.raises(PreconditionFailedError, match=rf"{uri} was changed"):
        store.write_conditional(uri, b"three", if_match=first)  # stale: read before "two" was written
    with pytest.raises(PreconditionFailedError, match="is absent"):
        store.write_conditional(missing_uri, b"x", if_match=first)
    with pytest.raises(ValueError, match="exactly one of"):
        store.write_conditional(uri, b"x")
    assert store.read_bytes(uri) == b"two"


def test_conditional_writes_create_once_and_swap_only_the_version_they_read(tmp_path):
    check_conditional_writes(LocalStore(), str(tmp_path / "pointer.json"), str(tmp_path / "nothing"),
                             lost=r"\(another writer got there first\)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pointer.json"]  # no lock file, no temporary


def test_compare_and_swap_loses_no_update_among_threads(tmp_path):
    """Eight threads add 25 each to one counter by read, compute, conditional write: none of the 200 is lost."""
    import threading

    from tfjobs.storage.store import PreconditionFailedError

    store, uri = LocalStore(), str(tmp_path / "counter")
    store.write_conditional(uri, b"0", if_absent=True)
    conflicts = []

    def add(times):
        for _ in range(times):
            while True:
                data, token = store.read_versioned(uri)
                try:
                    store.write_conditional(uri, str(int(data) + 1).encode(), if_match=token)
                    break
                except PreconditionFailedError:
                    conflicts.append(1)

    threads = [threading.Thread(target=add, args=(25,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.read_bytes(uri) == b"200"
    assert conflicts, "the threads never raced: the test proves nothing"


# Writes into <dir>/.<name>.<uuid>.tmp the way LocalStore does, says so, then waits to be killed mid-write.
KILLED_WRITER = """
import sys, time
from pathlib import Path
from tfjobs.storage.store import owned_temp

target = Path(sys.argv[1])
with owned_temp(target, lambda tmp: tmp.touch(exist_ok=False)) as tmp:
    tmp.write_bytes(b"half a file")
    print(tmp, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("write", ["write_bytes", "publish_dir", "reclaim"])
def test_a_killed_writers_temporary_is_reclaimed_and_a_live_writers_is_kept(tmp_path, write):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from tfjobs.storage.store import owned_temp, reclaim_temp_files

    directory = tmp_path / "out"
    directory.mkdir()
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(directory / "manifest.json")],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        orphan = Path(child.stdout.readline().strip())
        assert orphan.name.startswith(".manifest.json.") and orphan.exists()
        with owned_temp(directory / "shard-0", lambda tmp: tmp.mkdir()) as live:
            assert reclaim_temp_files(directory) == []  # the child is alive: its temporary is kept
            assert orphan.exists()
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            store = LocalStore()
            if write == "write_bytes":
                store.write_bytes(str(directory / "other.json"), b"{}")
            elif write == "publish_dir":
                (tmp_path / "src").mkdir()
                (tmp_path / "src" / "saved_model.pb").write_bytes(b"m")
                store.publish_dir(tmp_path / "src", str(directory / "7"), last=["saved_model.pb"], exclusive=True)
            else:
                assert reclaim_temp_files(directory) == [orphan]
            assert not orphan.exists()  # the killed writer's temporary went at the next write there
            assert live.is_dir()  # ours, still being written, was kept
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_a_reclaimer_racing_a_writer_never_costs_the_write(tmp_path):
    """Reclaimers scanning while writers create temporaries: every write lands whole, no temporary is left."""
    import threading

    from tfjobs.storage.store import reclaim_temp_files

    store, stop = LocalStore(), threading.Event()

    def reclaim():
        while not stop.is_set():
            reclaim_temp_files(tmp_path)

    reclaimers = [threading.Thread(target=reclaim) for _ in range(2)]
    for thread in reclaimers:
        thread.start()
    try:
        for i in range(300):
            store.write_bytes(str(tmp_path / f"f{i % 7}"), f"{i}".encode())
            assert store.read_bytes(str(tmp_path / f"f{i % 7}")) == f"{i}".encode()
    finally:
        stop.set()
        for thread in reclaimers:
            thread.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}" for i in range(7)]
