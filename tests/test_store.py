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
