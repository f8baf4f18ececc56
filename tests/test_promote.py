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
