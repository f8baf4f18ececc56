"""The model lifecycle through Airflow: the housing DAG on three days of deliveries, a rollback, the run report.

Day 1 delivers the whole housing CSV: its model is the first, judged by the absolute
bound alone, and goes to production. Day 2 delivers a random fifth of it (a partial
delivery: the same distribution, so no drift, but a fifth of the training rows): its
model still clears the $60,000 bound but is more than the spec's $1,000 worse than
day 1's on day 2's own test rows, so production stays day 1's. A forced promotion of
day 2 and a rollback to day 1 then take one command each. Day 3's delivery has its
median_income shifted by $20,000: the drift check stops the run before training.
Every run is `airflow dags test` on one SQLite home and one store (runs are shared
through module-scoped fixtures; few epochs).
"""

import datetime
import json
import os
import sqlite3
import tempfile

import pandas as pd
import pytest

from conftest import HOUSING_CSV, ROOT, airflow_dags_test
from tfjobs.promote import check_consistent

pytestmark = pytest.mark.slow
DAY1, DAY2, DAY3 = "2026-11-21", "2026-11-22", "2026-11-23"
EPOCHS = 8
ARTIFACTS = ROOT / "tests" / "artifacts"  # git-ignored
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def version_of(day: str) -> int:
    return int(datetime.datetime.fromisoformat(day).replace(tzinfo=datetime.timezone.utc).timestamp())


@pytest.fixture(scope="module")
def landing(tmp_path_factory):
    """Three days of deliveries: the whole CSV, a random fifth of it, the whole CSV with median_income shifted."""
    prefix = tmp_path_factory.mktemp("landing")
    os.symlink(HOUSING_CSV, prefix / f"{DAY1}.csv")
    frame = pd.read_csv(HOUSING_CSV, dtype=str, keep_default_na=False)
    frame.sample(frac=0.2, random_state=2).to_csv(prefix / f"{DAY2}.csv", index=False)
    shifted = frame.copy()
    shifted["median_income"] = (shifted["median_income"].astype(float) + 2.0).round(4).astype(str)
    shifted.to_csv(prefix / f"{DAY3}.csv", index=False)
    return prefix


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    dags_test, store = airflow_dags_test(home, "housing")
    return dags_test, store, home


@pytest.fixture(scope="module")
def days(airflow, landing):
    """Day 1, then day 2: each run's return code, log, metrics.json and production.json afterwards."""
    dags_test, store, _ = airflow
    conf = {"source_uri": f"{landing}/{{partition}}.csv", "epochs": EPOCHS}
    out = {}
    for day in (DAY1, DAY2):
        completed = dags_test(day, conf=conf)
        out[day] = {
            "returncode": completed.returncode,
            "log": completed.stdout + completed.stderr,
            "metrics": json.loads((store / f"runs/housing/{day}T000000/evaluate/metrics.json").read_text())
            if completed.returncode == 0 else None,
            "production": json.loads((store / "serving/housing/production.json").read_text())
            if completed.returncode == 0 else None,
        }
    return out


def serving(store) -> str:
    return str(store / "serving" / "housing")


def test_day_one_is_judged_by_the_bound_alone_and_goes_to_production(days):
    day = days[DAY1]
    assert day["returncode"] == 0, day["log"][-5000:]
    assert day["metrics"]["verdict"] == "promote" and day["metrics"]["champion"] is None
    assert day["metrics"]["reason"] == "no model in production: judged by the absolute bounds alone, which it clears"
    assert (day["production"]["version"], day["production"]["run"]) == (version_of(DAY1), f"{DAY1}T000000")


def test_a_worse_day_two_clears_the_bound_but_is_not_promoted_and_says_why(days, airflow):
    _, store, home = airflow
    day = days[DAY2]
    assert day["returncode"] == 0, day["log"][-5000:]  # not promoting is not a failure
    metrics = day["metrics"]
    mine, theirs = metrics["metrics"]["rmse"], metrics["champion"]["metrics"]["rmse"]
    assert mine <= 60_000 and mine - theirs > 1_000, (mine, theirs)  # clears the bound, worse beyond the change
    assert (metrics["verdict"], metrics["blessed"], metrics["champion"]["version"]) == (
        "keep production", False, version_of(DAY1))
    assert metrics["comparison"]["rmse"] == {
        "candidate": mine, "champion": theirs, "change": pytest.approx(mine - theirs), "allowed": 1000,
        "direction": "lower is better", "passed": False}
    assert metrics["reason"].startswith(f"worse than production version {version_of(DAY1)} (run {DAY1}T000000)")
    assert day["production"]["version"] == version_of(DAY1)  # production still points at day 1
    assert not (store / "serving" / "housing" / str(version_of(DAY2))).exists()
    assert "KEEP PRODUCTION" in day["log"] and f"Production version {version_of(DAY1)} on the same test rows" in day["log"]
    event = asset_events(home, "housing.evaluations")[-1]
    assert event["verdict"] == "keep production" and event["champion_metrics"]["rmse"] == pytest.approx(theirs)
    report = (store / f"runs/housing/{DAY2}T000000/report.html").read_text()
    assert "keep production" in report and f"{mine:,.0f}" in report and f"{theirs:,.0f}" in report


def asset_events(home, asset_name: str) -> list[dict]:
    """The extras of an asset's events, oldest first, from the Airflow database."""
    with sqlite3.connect(home / "airflow.db") as db:
        rows = db.execute("SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.name = ? "
                          "ORDER BY e.id", (asset_name,)).fetchall()
    return [json.loads(extra) if isinstance(extra, str) else extra for (extra,) in rows]


@pytest.fixture(scope="module")
def forced_then_rolled_back(days, airflow, landing, tmp_path_factory):
    """Force day 2 in (one run of the DAG), then roll back to day 1 (one run of the rollback DAG)."""
    dags_test, store, home = airflow
    forced = dags_test(DAY2, conf={"source_uri": f"{landing}/{{partition}}.csv", "epochs": EPOCHS,
                                   "force_promotion": True})
    after_force = (check_consistent(serving(store)), (store / "serving/housing/models.config").read_text())
    rollback_test, _ = airflow_dags_test(home, "housing_rollback")
    rolled_back = rollback_test(DAY3, conf={"version": version_of(DAY1), "reason": "day 2 was a partial delivery"})
    return forced, after_force, rolled_back


def test_a_forced_promotion_and_a_rollback_each_take_one_command_and_keep_both_files_consistent(
        forced_then_rolled_back, airflow):
    _, store, _ = airflow
    forced, (pointer, config), rolled_back = forced_then_rolled_back
    assert forced.returncode == 0, (forced.stdout + forced.stderr)[-5000:]
    assert pointer["version"] == version_of(DAY2) and pointer["forced"]["by"]
    assert pointer["reason"].startswith("forced by") and pointer["previous"] == version_of(DAY1)
    assert f'version_labels {{ key: "stable" value: {version_of(DAY2)} }}' in config
    metrics = json.loads((store / f"runs/housing/{DAY2}T000000/evaluate/metrics.json").read_text())
    assert metrics["verdict"] == "promote (forced)" and metrics["forced"]["at"]

    assert rolled_back.returncode == 0, (rolled_back.stdout + rolled_back.stderr)[-5000:]
    pointer = check_consistent(serving(store))  # production.json and models.config agree
    assert pointer["version"] == version_of(DAY1)
    assert pointer["reason"] == f"rollback from version {version_of(DAY2)}: day 2 was a partial delivery"
    assert [h["version"] for h in pointer["history"][:2]] == [version_of(DAY2), version_of(DAY1)]
    config = (store / "serving/housing/models.config").read_text()
    assert f"specific {{ versions: {version_of(DAY1)} }}" in config
    assert (store / "serving" / "housing" / str(version_of(DAY2)) / "saved_model.pb").exists()  # kept, not served


def test_a_shifted_median_income_stops_the_run_before_training_naming_the_feature(
        forced_then_rolled_back, airflow, landing):
    dags_test, store, _ = airflow
    completed = dags_test(DAY3, conf={"source_uri": f"{landing}/{{partition}}.csv", "epochs": EPOCHS})
    log = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert "feature(s) drifted against the data of production version" in log
    assert "median_income: jensen-shannon" in log and "drift.action is stop" in log
    statistics = json.loads((store / f"statistics/housing/{DAY3}/statistics.json").read_text())
    drift = statistics["drift"]["features"]["median_income"]
    assert drift["drifted"] and drift["distance"] > 0.1 and drift["detail"].startswith("mean 3.87")
    assert statistics["drift"]["baseline"]["version"] == version_of(DAY1)  # production's data, after the rollback
    assert not (store / "shards" / "housing" / DAY3).exists()
    assert not (store / "runs" / "housing" / f"{DAY3}T000000" / "train").exists()
    report = (store / f"runs/housing/{DAY3}T000000/report.html").read_text()
    assert "stopped: drift" in report and "median_income" in report


def test_the_run_report_renders_every_section_in_chromium_and_the_tasks_link_to_it(days, airflow):
    from playwright.sync_api import sync_playwright

    from tfjobs.run_report import SECTIONS

    _, store, home = airflow
    report = store / f"runs/housing/{DAY2}T000000/report.html"
    with sqlite3.connect(home / "airflow.db") as db:
        links = db.execute("SELECT task_id, value FROM xcom WHERE key = '_link_run_report' AND run_id IN "
                           "(SELECT run_id FROM dag_run WHERE dag_id = 'housing' AND logical_date LIKE ?)",
                           (f"{DAY1}%",)).fetchall()
    linked = {task: json.loads(value) for task, value in links}
    assert set(linked) >= {"evaluate", "export", "report"}
    assert set(linked.values()) == {(store / f"runs/housing/{DAY1}T000000/report.html").resolve().as_uri()}

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "run_report.png"
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport={"width": 1200, "height": 900},
            offline=True)  # the report must need no network
        page = browser.new_page()
        try:
            page.goto(report.as_uri(), timeout=60_000)
            for name in SECTIONS:
                assert page.locator(f"section#{name} h2").is_visible(), name
                assert page.locator(f"section#{name}").inner_text().strip(), name
            assert page.locator("section#evaluation table").first.is_visible()
            images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
            assert len(images) >= 10 and all(done and width > 0 for done, width in images), images
            assert "production's model" in page.locator("section#evaluation").inner_text()
        finally:
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    assert screenshot.stat().st_size > 50_000
