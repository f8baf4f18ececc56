"""Shardline as a service on this machine: a real scheduler, Celery workers, the REST API, the UI and a backfill.

One stack for the module (see ``service_stack.py``): PostgreSQL, Redis, the
api-server (FAB auth manager), scheduler, dag-processor, triggerer, a CPU Celery
worker on the default queue and a GPU Celery worker on ``gpu``. The tests drive it
the way users do: a backfill of three days, a run triggered by an operator through
the REST API with the request the UI's trigger form sends, a viewer refused a
trigger, sources outside the allow-list refused at fetch, and the trigger form
itself in headless Chromium. The screenshot and the stack's logs are kept under ``tests/artifacts/``.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import HOUSING_CSV, ROOT
from processes import wait_for
from service_stack import (ADMIN, CPU_WORKER_HOST, GPU_QUEUE, GPU_WORKER_HOSTS, OPERATOR, TUNING_DATABASE, VIEWER,
                           ServiceStack)
from tfjobs.export import published_versions
from tfjobs.storage.store import read_json

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "tests" / "artifacts"
DAG = "penguins"
RUN_TIMEOUT_S = 600
CHROMIUM = "/usr/bin/chromium"
# Without these, Chromium on a closed network hangs on updates, sync and GPU probing.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    stack = ServiceStack(root, store_uri=str(root / "store"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.copytree(stack.logs, ARTIFACTS / "service-logs", dirs_exist_ok=True)
        for name, process in stack.processes.items():  # every process group it started is gone
            with pytest.raises(ProcessLookupError):
                os.killpg(process.pid, 0)
            assert process.returncode is not None, name


@pytest.fixture(scope="module")
def api(stack):
    with stack.api() as client:
        yield client


@pytest.fixture(scope="module")
def operator_api(stack):
    with stack.api(OPERATOR) as client:
        yield client


@pytest.fixture(scope="module")
def viewer_api(stack):
    with stack.api(VIEWER) as client:
        yield client


def trigger_request(api, **changes) -> dict:
    """The request the UI's trigger form sends: every Param's value, some changed, and a logical date."""
    params = api.get(f"/dags/{DAG}/details").json()["params"]
    conf = {name: param["value"] for name, param in params.items()}
    logical_date = changes.pop("logical_date", datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
    return {"conf": {**conf, **changes}, "logical_date": logical_date.isoformat(), "data_interval_start": None,
            "data_interval_end": None, "partition_key": None}


def finished_run(api, run_id: str, timeout_s: float = RUN_TIMEOUT_S, dag: str = DAG) -> dict:
    """The run once it has finished; fails naming the task states if it did not succeed."""
    def run_if_finished():
        run = api.get(f"/dags/{dag}/dagRuns/{urllib.parse.quote(run_id, safe='')}").json()
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(run_if_finished, timeout_s, f"run {run_id}", interval_s=3)
    assert run["state"] == "success", {t: ti["state"] for t, ti in task_instances(api, run_id, dag).items()}
    return run


def task_instances(api, run_id: str, dag: str = DAG) -> dict[str, dict]:
    response = api.get(f"/dags/{dag}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances")
    return {ti["task_id"]: ti for ti in response.json()["task_instances"]}


def task_result(api, run_id: str, task_id: str, dag: str = DAG) -> dict:
    path = f"/dags/{dag}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/return_value"
    return api.get(path).json()["value"]


def task_links(api, run_id: str, task_id: str) -> dict[str, str]:
    path = f"/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}/links"
    return api.get(path).json()["extra_links"]


def unix_seconds(day: datetime.date) -> int:
    return int(datetime.datetime.combine(day, datetime.time(), datetime.timezone.utc).timestamp())


def daily_deliveries(landing: Path, days: list[datetime.date]) -> str:
    """One CSV per day, each a different sample of the penguins, as an upstream system delivers them."""
    import palmerpenguins

    landing.mkdir(parents=True, exist_ok=True)
    penguins = palmerpenguins.load_penguins()
    for day in days:
        penguins.sample(frac=0.9, random_state=day.toordinal()).to_csv(landing / f"penguins-{day}.csv", index=False)
    return str(landing / "penguins-{partition}.csv")


def test_backfill_of_three_days_publishes_three_versions_and_serves_the_newest(stack, api, operator_api):
    today = datetime.datetime.now(datetime.timezone.utc).date()
    days = [today - datetime.timedelta(days=n) for n in (6, 5, 4)]
    source_uri = daily_deliveries(stack.landing, days)
    response = operator_api.post("/backfills", json={
        "dag_id": DAG, "from_date": f"{days[0]}T00:00:00Z", "to_date": f"{days[-1]}T00:00:00Z",
        "max_active_runs": 3, "reprocess_behavior": "none", "run_backwards": False,
        "dag_run_conf": {"source_uri": source_uri},
    })
    assert response.status_code == 200, response.text
    backfill_id = response.json()["id"]
    def backfill_runs():
        runs = [run for run in api.get(f"/dags/{DAG}/dagRuns").json()["dag_runs"] if run["run_type"] == "backfill"]
        return runs if len(runs) == 3 else None

    runs = wait_for(backfill_runs, 60, "three backfill runs")
    assert sorted(run["logical_date"][:10] for run in runs) == [str(day) for day in days]
    for run in runs:
        finished_run(api, run["dag_run_id"])

    store = Path(stack.store_uri)
    for stage in ("raw", "validated", "shards", "preprocessing"):
        assert sorted(p.name for p in (store / stage / DAG).iterdir()) == [str(day) for day in days], stage
    fetched = [read_json(str(store / "raw" / DAG / str(day) / "manifest.json")) for day in days]
    assert [m["source"] for m in fetched] == [source_uri.replace("{partition}", str(day)) for day in days]
    versions = published_versions(str(store / "serving" / DAG))
    assert list(versions) == [unix_seconds(day) for day in days]
    # TF Serving serves the highest version: the newest day's model.
    newest = read_json(versions[max(versions)] + "/shardline.json")
    assert f"/runs/{DAG}/{days[-1]}T000000/train/" in newest["trained_model"]
    # The scheduler closes the backfill once its runs are done.
    wait_for(lambda: api.get(f"/backfills/{backfill_id}").json()["completed_at"], 120, "the backfill to complete")


def test_rest_api_trigger_routes_training_to_the_gpu_worker_and_applies_the_param(stack, api, operator_api):
    assert api.get(f"/dags/{DAG}/details").json()["params"]["epochs"]["value"] != 6
    response = operator_api.post(f"/dags/{DAG}/dagRuns", json=trigger_request(operator_api, epochs=6))
    assert response.status_code == 200, response.text
    run = finished_run(api, response.json()["dag_run_id"])
    assert run["conf"]["epochs"] == 6 and run["triggering_user_name"] == OPERATOR

    tis = task_instances(api, run["dag_run_id"])
    assert tis["train"]["queue"] == GPU_QUEUE and tis["train"]["hostname"] in GPU_WORKER_HOSTS
    for task_id, ti in tis.items():
        if task_id != "train":
            assert (ti["queue"], ti["hostname"]) == ("default", CPU_WORKER_HOST), task_id

    # The Param reached the training job.
    assert tis["train"]["rendered_fields"]["hyperparameters"]["epochs"] == "6"
    trained = task_result(api, run["dag_run_id"], "train")
    assert trained["epochs_run"] <= 6
    assert read_json(trained["summary_uri"])["settings"]["epochs"] == 6

    # Extra links lead from the tasks to what they wrote.
    links = {**task_links(api, run["dag_run_id"], "fetch"), **task_links(api, run["dag_run_id"], "train")}
    assert set(links) == {"Manifest", "TensorBoard logs", "Trained model"}
    for url in links.values():
        assert Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).exists(), url
    assert links["TensorBoard logs"].startswith(Path(stack.store_uri).as_uri() + f"/runs/{DAG}/")


def test_a_viewer_reads_but_is_refused_a_trigger_and_a_backfill(viewer_api):
    assert viewer_api.get(f"/dags/{DAG}").status_code == 200
    assert viewer_api.get(f"/dags/{DAG}/dagRuns").status_code == 200
    response = viewer_api.post(f"/dags/{DAG}/dagRuns", json=trigger_request(viewer_api))
    assert response.status_code == 403, response.text
    today = datetime.datetime.now(datetime.timezone.utc).date()
    response = viewer_api.post("/backfills", json={"dag_id": DAG, "from_date": f"{today}T00:00:00Z",
                                                   "to_date": f"{today}T00:00:00Z"})
    assert response.status_code == 403, response.text
    runs = viewer_api.get(f"/dags/{DAG}/dagRuns").json()["dag_runs"]
    assert not [run for run in runs if run["triggering_user_name"] == VIEWER]


def test_a_triggered_source_outside_the_allow_list_fails_at_fetch_and_nothing_lands(stack, api, operator_api):
    escaping = f"{stack.landing}/{{partition}}" + "/.." * 40 + "/etc/passwd"
    sources = ["/etc/passwd", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/", escaping]
    first_day = datetime.date(2026, 1, 1)
    run_ids = {}
    for n, source in enumerate(sources):
        day = first_day + datetime.timedelta(days=n)
        request = trigger_request(operator_api, source_uri=source, logical_date=datetime.datetime(
            day.year, day.month, day.day, tzinfo=datetime.timezone.utc))
        response = operator_api.post(f"/dags/{DAG}/dagRuns", json=request)
        assert response.status_code == 200, response.text
        run_ids[source] = (day, response.json()["dag_run_id"])
    for source, (day, run_id) in run_ids.items():
        run = wait_for(lambda run_id=run_id: (lambda r: r if r["state"] in ("success", "failed") else None)(
            api.get(f"/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}").json()), RUN_TIMEOUT_S, run_id, 3)
        tis = task_instances(api, run_id)
        assert (run["state"], tis["fetch"]["state"], tis["fetch"]["try_number"]) == ("failed", "failed", 1), source
        # Every step after fetch is skipped as upstream_failed; the run report, a teardown, still says what happened.
        assert {tis[t]["state"] for t in tis if t not in ("fetch", "report")} == {"upstream_failed"}, source
        assert tis["report"]["state"] == "success", source
        log = json.dumps(api.get(f"/dags/{DAG}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/fetch/logs/1",
                                 params={"full_content": True}).json())
        assert "is not under any allowed source prefix, so nothing was read from it" in log, (source, log[-3000:])
        assert "AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES" in log, source
        assert not (Path(stack.store_uri) / "raw" / DAG / str(day)).exists(), source
    assert "root:" not in "".join(p.read_text(errors="replace") for p in Path(stack.store_uri).rglob("*.csv"))


def test_ui_trigger_form_starts_a_run_that_succeeds(stack, api):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "service_ui_trigger.png"
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 1000}
        )
        page = browser.new_page()
        try:
            page.goto(f"{stack.url}/dags/{DAG}", timeout=120_000)
            page.get_by_label("Username").fill(ADMIN)
            page.get_by_label("Password").fill(stack.password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"**/dags/{DAG}", timeout=60_000)

            page.get_by_role("button", name="Trigger").first.click()
            form = page.get_by_role("dialog")
            form.get_by_text("Run Parameters").wait_for(timeout=60_000)
            form.get_by_label("Epochs").fill("5")
            with page.expect_response(lambda r: r.url.endswith(f"/dags/{DAG}/dagRuns") and r.request.method == "POST",
                                      timeout=60_000) as triggered:
                form.get_by_role("button", name="Trigger").click()
            assert triggered.value.status == 200, triggered.value.text()
            run_id = triggered.value.json()["dag_run_id"]

            # The UI opens the run and refreshes it; a person would reload now and then too.
            page.wait_for_url("**/runs/**", timeout=60_000)
            state = page.get_by_test_id("state-badge").first
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while state.inner_text().strip() not in ("Success", "Failed") and time.monotonic() < deadline:
                page.wait_for_timeout(15_000)
                if state.inner_text().strip() not in ("Success", "Failed"):
                    page.reload()
            assert state.inner_text().strip() == "Success"
        finally:
            page.screenshot(path=str(screenshot))
            browser.close()

    run = finished_run(api, run_id, timeout_s=30)
    assert run["conf"]["epochs"] == 5 and run["triggering_user_name"] == ADMIN
    assert task_instances(api, run_id)["train"]["rendered_fields"]["hyperparameters"]["epochs"] == "5"
    assert screenshot.stat().st_size > 10_000


def test_tuning_runs_trial_runners_at_once_on_the_gpu_workers_and_survives_a_killed_runner(stack, api):
    """Housing with tuning on: two mapped runners share one study in the stack's PostgreSQL.

    Once each runner has a trial in training and one trial is complete, one runner's process
    is killed (SIGKILL, as a lost machine would leave it). Its task is retried; its trial goes
    stale, is queued again and run once; every completed trial stays as it was.
    """
    import optuna
    from optuna.trial import TrialState

    dag = "housing"
    storage = optuna.storages.RDBStorage(stack.tuning_url)  # one connection pool for the polls below
    params = api.get(f"/dags/{dag}/details").json()["params"]
    conf = {name: param["value"] for name, param in params.items()}
    conf.update(source_uri=str(HOUSING_CSV), tuning=True, tuning_trials=6, tuning_parallel=2, epochs=4)
    response = api.post(f"/dags/{dag}/dagRuns", json={
        "conf": conf, "logical_date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "data_interval_start": None, "data_interval_end": None, "partition_key": None,
    })
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]

    def study():
        names = optuna.study.get_all_study_names(storage)
        return optuna.load_study(study_name=names[0], storage=storage) if names else None

    def both_runners_training():
        current = study()
        trials = current.get_trials() if current else []
        running = {t.user_attrs.get("runner"): t for t in trials if t.state == TrialState.RUNNING}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        # Runner 1 in training: its settings all drawn (a trial killed while they are drawn has fewer).
        if complete and set(running) == {0, 1} and len(running[1].params) == len(complete[0].params):
            return trials, running[1]
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) < conf["tuning_trials"], "the study finished before both runners were seen training"
        return None

    # Polled often: on an idle machine a trial of housing takes about 3 s.
    trials, victim = wait_for(both_runners_training, 900, "both runners training, after a completed trial", 0.2)
    completed = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)  # runner 1's task process, mid-trial
    finished_run(api, run_id, timeout_s=1500, dag=dag)

    # The runners ran at once, each on a GPU worker of its own; the killed one's retry finished the job.
    quoted = urllib.parse.quote(run_id, safe="")
    tries = {i: api.get(f"/dags/{dag}/dagRuns/{quoted}/taskInstances/tune/{i}/tries").json()["task_instances"]
             for i in (0, 1)}
    assert [t["state"] for t in tries[1]] == ["failed", "success"], tries[1]
    assert all(t["queue"] == GPU_QUEUE and t["hostname"] in GPU_WORKER_HOSTS for ts in tries.values() for t in ts)
    first, other = tries[1][0], tries[0][-1]
    assert first["start_date"] < other["end_date"] and other["start_date"] < first["end_date"]  # overlapping
    assert first["hostname"] != other["hostname"]

    # The study: nothing completed lost or changed; the killed trial run again, once; the budget met.
    trials = study().get_trials()
    by_number = {t.number: t for t in trials}
    assert {n: by_number[n].value for n in completed} == completed
    assert by_number[victim.number].state == TrialState.FAIL and "error" not in by_number[victim.number].user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == victim.params
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= 6 and len({t.number for t in finished}) == len(finished)

    best = task_result(api, run_id, "tune_best", dag)
    assert best["tuned"] and best["storage"] == f"connection {TUNING_DATABASE}"
    assert best["best_trial"] in {t.number for t in finished if t.state == TrialState.COMPLETE}
    trained = task_result(api, run_id, "train", dag)
    assert read_json(trained["summary_uri"])["tuned_settings"] == best["best_settings"]
    record = {"tries": {i: [(t["hostname"], t["start_date"], t["end_date"], t["state"]) for t in ts]
                        for i, ts in tries.items()},
              "killed_trial": victim.number, "retried_as": retries[0].number,
              "trials": [(t.number, t.state.name, t.value, t.user_attrs.get("runner"), t.user_attrs.get("attempt"))
                         for t in trials]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "service_tuning.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
