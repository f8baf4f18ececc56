"""The production pointer: promotion, canary, rollback and pruning keep production.json and models.config in step."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from tfjobs.export import published_versions
from tfjobs.promote import champion, check_consistent, models_config, production, prune, set_production
from tfjobs.rollback import rollback

DAY = 86_400


@pytest.fixture
def serving(tmp_path):
    """A serving prefix with three published versions (a marker and metadata each), none promoted yet."""
    root = tmp_path / "serving" / "housing"
    for day in (1, 2, 3):
        version = root / str(day * DAY)
        version.mkdir(parents=True)
        (version / "saved_model.pb").write_bytes(b"")
        (version / "shardline.json").write_text(json.dumps({
            "model_name": "housing", "run": f"2026-01-0{day}T000000", "weights_sha256": f"w{day}",
            "test_metrics": {"rmse": 50_000.0 + day}}))
    return str(root)


def test_before_any_promotion_the_champion_is_the_newest_version(serving):
    assert production(serving) is None
    assert (champion(serving).version, champion(serving).run) == (3 * DAY, "2026-01-03T000000")


def test_promotion_writes_the_pointer_and_the_tf_serving_config_and_keeps_a_history(serving):
    first = set_production(serving, DAY, reason="first model", by="ci", run="2026-01-01T000000")
    assert (first.version, first.previous, first.rewritten) == (DAY, None, True)
    second = set_production(serving, 2 * DAY, reason="beats production", by="ci")
    assert (second.previous, champion(serving).version) == (DAY, 2 * DAY)
    pointer = check_consistent(serving)
    assert pointer["run"] == "2026-01-02T000000" and pointer["metrics"] == {"rmse": 50_002.0}
    assert [h["version"] for h in pointer["history"]] == [DAY] and pointer["promoted_by"] == "ci"
    config = open(f"{serving}/models.config").read()
    assert "model_version_policy { specific { versions: 172800 } }" in config
    assert 'version_labels { key: "stable" value: 172800 }' in config and "canary" not in config
    again = set_production(serving, 2 * DAY, reason="again", by="ci")
    assert not again.rewritten  # already production: nothing rewritten


def test_a_canary_is_loaded_beside_production_and_becomes_production_when_promoted(serving):
    set_production(serving, DAY, reason="first", by="ci")
    canary = set_production(serving, 3 * DAY, reason="try it", by="ci", canary=True)
    assert (canary.version, canary.canary) == (DAY, 3 * DAY)
    assert models_config("housing", "/m", DAY, 3 * DAY).count("version_labels") == 2
    assert check_consistent(serving)["canary"]["version"] == 3 * DAY
    promoted = set_production(serving, 3 * DAY, reason="canary was fine", by="ci")
    assert (promoted.version, promoted.canary) == (3 * DAY, None)


def test_rollback_goes_to_the_previous_production_or_a_named_version_in_one_step(serving):
    set_production(serving, DAY, reason="first", by="ci")
    set_production(serving, 3 * DAY, reason="forced", by="alice", forced={"by": "alice", "at": "now"})
    back = rollback(serving, by="bob", reason="day 3 was bad")
    assert (back.version, back.previous) == (DAY, 3 * DAY)
    pointer = check_consistent(serving)
    assert pointer["reason"] == "rollback from version 259200: day 3 was bad" and pointer["promoted_by"] == "bob"
    assert rollback(serving, to=2 * DAY).version == 2 * DAY
    with pytest.raises(FileNotFoundError, match="Version 9 is not published"):
        rollback(serving, to=9)


def test_the_command_lines_promote_and_roll_back(serving):
    def run(module, *args):
        completed = subprocess.run([sys.executable, "-m", module, "--serving", serving, *args, "--log-level", "ERROR"],
                                   capture_output=True, text=True, cwd=ROOT, check=True)
        return json.loads(completed.stdout)

    assert run("tfjobs.promote", "--version", str(2 * DAY), "--by", "alice")["version"] == 2 * DAY
    assert run("tfjobs.promote", "--version", str(3 * DAY))["version"] == 3 * DAY
    assert run("tfjobs.rollback")["version"] == 2 * DAY
    assert check_consistent(serving)["promoted_by"]


def test_pruning_deletes_the_oldest_versions_but_never_production(serving):
    set_production(serving, DAY, reason="first", by="ci")
    assert prune(serving, keep_versions=1) == [2 * DAY, 3 * DAY]
    assert list(published_versions(serving)) == [DAY]
    promoted = set_production(serving, DAY, reason="x", by="ci", keep_versions=1)
    assert promoted.pruned == []


def test_a_pointer_to_a_version_that_is_gone_says_how_to_recover(serving):
    set_production(serving, DAY, reason="first", by="ci")
    import shutil

    shutil.rmtree(f"{serving}/{DAY}")
    with pytest.raises(FileNotFoundError, match="roll back to one of them"):
        champion(serving)


def test_a_backfilled_older_day_does_not_displace_a_newer_production_unless_forced(serving):
    from tfjobs.promote import NotPromoted, promote_evaluated

    set_production(serving, 3 * DAY, reason="newest day", by="ci")
    blessed = {"blessed": True, "reason": "within the change thresholds", "metrics": {"rmse": 1.0}, "forced": None}
    with pytest.raises(NotPromoted, match="production version 259200 is a newer day's than 86400"):
        promote_evaluated(serving, DAY, blessed, run="r", by="ci")
    assert promote_evaluated(serving, DAY, {**blessed, "forced": {"by": "alice"}}, run="r", by="ci").version == DAY
    with pytest.raises(NotPromoted, match="Not promoted: worse"):
        promote_evaluated(serving, 3 * DAY, {"blessed": False, "reason": "worse", "failures": []}, run="r", by="ci")


def publish_versions(store_root: str, days) -> None:
    from tfjobs.storage.store import store_for

    store = store_for(store_root)
    for day in days:
        store.write_bytes(f"{store_root}/{day * DAY}/saved_model.pb", b"")
        store.write_bytes(f"{store_root}/{day * DAY}/shardline.json", json.dumps({
            "model_name": "housing", "run": f"run-{day}", "test_metrics": {"rmse": float(day)}}).encode())


def promote_at_once(serving: str, production_days: list[int], canary_day: int) -> dict:
    """Promote each day (and one canary) from its own thread, all released at once; the final pointer."""
    import threading

    barrier, errors = threading.Barrier(len(production_days) + 1), []

    def promote(day, canary=False):
        barrier.wait()
        try:
            set_production(serving, day * DAY, reason=f"day {day}", by=f"thread-{day}", canary=canary)
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=promote, args=(day,)) for day in production_days]
    threads.append(threading.Thread(target=promote, args=(canary_day, True)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return check_consistent(serving)  # models.config matches the final production.json


def assert_no_promotion_lost(pointer: dict, first_day: int, production_days: list[int], canary_day: int) -> None:
    chain = [pointer["version"]] + [entry["version"] for entry in pointer["history"]]
    # Every promotion is production or in the history, once each; the first production is the oldest entry.
    assert sorted(chain) == sorted(day * DAY for day in [first_day, *production_days])
    assert chain[-1] == first_day * DAY and pointer["previous"] == chain[1]
    assert [entry["reason"] for entry in pointer["history"]] == [f"day {v // DAY}" for v in chain[1:]]
    assert pointer["canary"]["version"] == canary_day * DAY  # no production promotion dropped the canary


def test_promotions_at_once_on_a_local_store_lose_no_update(tmp_path):
    serving = str(tmp_path / "serving" / "housing")
    publish_versions(serving, range(1, 9))
    set_production(serving, DAY, reason="day 1", by="ci")
    pointer = promote_at_once(serving, [2, 3, 4, 5, 6, 7], canary_day=8)
    assert_no_promotion_lost(pointer, 1, [2, 3, 4, 5, 6, 7], 8)


def test_promotions_at_once_on_s3_lose_no_update():
    from s3_server import moto_s3
    from tfjobs.storage import s3

    with moto_s3() as endpoint:
        s3.configure(lambda: endpoint.client(), source="the test endpoint")
        try:
            serving = f"s3://{endpoint.bucket}/serving/housing"
            publish_versions(serving, range(1, 9))
            set_production(serving, DAY, reason="day 1", by="ci")
            pointer = promote_at_once(serving, [2, 3, 4, 5, 6, 7], canary_day=8)
        finally:
            s3.configure()
    assert_no_promotion_lost(pointer, 1, [2, 3, 4, 5, 6, 7], 8)


def first_write_loses_to(monkeypatch, before_first_write):
    """Run ``before_first_write`` (another promotion) just before this process's first write of production.json."""
    from tfjobs.storage.store import LocalStore

    real, calls = LocalStore.write_conditional, []

    def interleaved(self, uri, data, **condition):
        if uri.endswith("production.json") and not calls:
            calls.append(uri)
            monkeypatch.setattr(LocalStore, "write_conditional", real)
            before_first_write()
            monkeypatch.setattr(LocalStore, "write_conditional", interleaved)
        return real(self, uri, data, **condition)

    monkeypatch.setattr(LocalStore, "write_conditional", interleaved)
    return calls


def test_a_promotion_that_lost_the_race_recomputes_on_the_winners_pointer(serving, monkeypatch):
    set_production(serving, DAY, reason="first", by="ci")
    calls = first_write_loses_to(monkeypatch, lambda: set_production(serving, 3 * DAY, reason="canary", canary=True))
    set_production(serving, 2 * DAY, reason="second", by="ci")
    assert calls
    pointer = check_consistent(serving)
    assert (pointer["version"], pointer["canary"]["version"], pointer["previous"]) == (2 * DAY, 3 * DAY, DAY)


def test_an_older_day_never_displaces_a_newer_one_that_lands_while_it_promotes(serving, monkeypatch):
    from tfjobs.promote import NotPromoted, promote_evaluated

    set_production(serving, DAY, reason="first", by="ci")
    first_write_loses_to(monkeypatch, lambda: set_production(serving, 3 * DAY, reason="day 3", by="ci"))
    evaluation = {"blessed": True, "metrics": {"rmse": 1.0}, "reason": "blessed"}
    with pytest.raises(NotPromoted, match="production version 259200 is a newer day's than 172800"):
        promote_evaluated(serving, 2 * DAY, evaluation, run="r2", by="ci")
    assert check_consistent(serving)["version"] == 3 * DAY


def test_a_promotion_killed_before_models_config_converges_when_run_again(serving, monkeypatch):
    from tfjobs import promote

    set_production(serving, DAY, reason="first", by="ci")
    real = promote.sync_models_config
    monkeypatch.setattr(promote, "sync_models_config", lambda uri, pointer=None: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        set_production(serving, 2 * DAY, reason="second", by="ci")
    with pytest.raises(ValueError, match="models.config does not match production.json"):
        check_consistent(serving)
    monkeypatch.setattr(promote, "sync_models_config", real)
    again = set_production(serving, 2 * DAY, reason="second", by="ci")
    assert not again.rewritten and check_consistent(serving)["version"] == 2 * DAY


def test_a_promotion_that_keeps_losing_gives_up_naming_the_conflict(serving, monkeypatch):
    from tfjobs import promote
    from tfjobs.storage.store import LocalStore, PreconditionFailedError

    set_production(serving, DAY, reason="first", by="ci")
    monkeypatch.setattr(promote, "MAX_ATTEMPTS", 3)
    def always_lost(self, uri, data, **condition):
        raise PreconditionFailedError(uri, "was changed")

    monkeypatch.setattr(LocalStore, "write_conditional", always_lost)
    with pytest.raises(promote.PromotionConflictError, match=r"production.json changed 3 times .*Nothing of this one"):
        set_production(serving, 2 * DAY, reason="second", by="ci")
    assert production(serving)["version"] == DAY


def test_a_rollback_that_a_promotion_overtakes_fails_rather_than_undo_it(serving, monkeypatch):
    from tfjobs.rollback import ProductionChangedError

    set_production(serving, DAY, reason="first", by="ci")
    set_production(serving, 2 * DAY, reason="second", by="ci")
    first_write_loses_to(monkeypatch, lambda: set_production(serving, 3 * DAY, reason="third", by="ci"))
    with pytest.raises(ProductionChangedError, match="changed from version 172800 to 259200 while this rollback ran"):
        rollback(serving, by="bob")
    pointer = check_consistent(serving)
    assert (pointer["version"], pointer["previous"]) == (3 * DAY, 2 * DAY)


def test_pruning_keeps_a_version_that_another_run_promotes_while_it_prunes(tmp_path, monkeypatch):
    from tfjobs import promote

    serving = str(tmp_path / "serving" / "housing")
    publish_versions(serving, range(1, 6))
    set_production(serving, 5 * DAY, reason="day 5", by="ci")
    real, promoted = promote.production, []

    def promotion_lands_after_the_listing(uri):  # another run promotes day 1 while prune walks the versions
        if not promoted:
            promoted.append(set_production(serving, DAY, reason="day 1 by hand", by="alice"))
        return real(uri)

    monkeypatch.setattr(promote, "production", promotion_lands_after_the_listing)
    pruned = prune(serving, keep_versions=2)
    assert promoted and pruned == [2 * DAY, 3 * DAY, 4 * DAY]  # day 1 is production now: kept
    assert sorted(published_versions(serving)) == [DAY, 5 * DAY]
    assert check_consistent(serving)["version"] == DAY


def test_a_promotion_of_a_version_pruned_meanwhile_leaves_production_as_it_was(serving):
    from tfjobs.storage.store import LocalStore

    set_production(serving, DAY, reason="first", by="ci")
    calls = []

    def prune_day_2(old):  # another promotion's prune, between the listing and the write
        calls.append(LocalStore().delete(f"{serving}/{2 * DAY}"))

    with pytest.raises(FileNotFoundError, match="Version 172800 .* was deleted .* production was not changed"):
        set_production(serving, 2 * DAY, reason="second", by="ci", check=prune_day_2)
    assert calls and check_consistent(serving)["version"] == DAY
