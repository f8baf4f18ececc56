"""Runs that overlap on one store: two dates of one DAG, two DAGs, and two runs of the same date.

Several ``airflow dags test`` processes start at once, each with its own AIRFLOW_HOME and SQLite
database (what the workers of separate schedulers, or of one scheduler with ``max_active_runs``
raised, look like to the store), all against ONE local store:

- penguins for 2026-11-25 twice (the scheduled run and a manual trigger of the same date racing:
  the same partition, the same run directory, the same proposed serving version);
- penguins for 2026-11-26 (another date of the same DAG);
- housing for 2026-11-24 (another DAG on the same store).

While they run, a reader polls the serving prefixes as TF Serving and Shardline's readers would.
It asserts: every run succeeded, and a task try failed only for losing the race for a serving version
(its retry, a second later, finds the model published: nothing was written over the winner's); every partition's outputs are whole (each file its manifest names, with
its checksum) and the two penguins dates cut the same source into the same shards; each date has its
own serving versions, on its own day, each complete; ``production.json``, once written, was never
missing or unreadable, and points at a published version.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import HOUSING_CSV, airflow_dags_test

pytestmark = pytest.mark.slow

RUNS = {  # name: (DAG, logical date, conf)
    "penguins 11-25 (scheduled)": ("penguins", "2026-11-25", None),
    "penguins 11-25 (manual)": ("penguins", "2026-11-25", None),
    "penguins 11-26": ("penguins", "2026-11-26", None),
    "housing 11-24": ("housing", "2026-11-24", {"source_uri": str(HOUSING_CSV), "epochs": 12}),
}
# The version race's errors, as a failed try logs them: the rename refused, then the export's error it causes.
RACE_MESSAGES = ("Directory not empty", "published by another run", "VersionTakenError", "AlreadyPublishedError")
DAY = 86_400


def day_of(version: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(version // DAY * DAY))


class ServingWatch:
    """Polls ``<store>/serving/*/`` while the runs go: what a version scan and a production reader saw."""

    def __init__(self, store: Path):
        self.store, self.problems, self.polls = store, [], 0
        self.production_seen: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        while not self.done.is_set():
            self.poll()
            time.sleep(0.05)

    def poll(self):
        self.polls += 1
        for model in (self.store / "serving").glob("*") if (self.store / "serving").is_dir() else ():
            for child in model.glob("*"):
                if child.name.isdigit() and (child / "saved_model.pb").exists():
                    names = {p.relative_to(child).as_posix() for p in child.rglob("*") if p.is_file()}
                    if not {"shardline.json", "model.keras", "variables/variables.index"} <= names:
                        self.problems.append(f"{child} had saved_model.pb without all its files: {sorted(names)}")
            pointer = model / "production.json"
            try:
                json.loads(pointer.read_text())
                self.production_seen.add(model.name)
            except FileNotFoundError:
                if model.name in self.production_seen:
                    self.problems.append(f"{pointer} went missing after it was written")
            except ValueError as err:
                self.problems.append(f"{pointer} was unreadable: {err}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four runs, started together against one store; each one's return code and log."""
    root = tmp_path_factory.mktemp("concurrent")
    store = root / "store"
    with pytest.MonkeyPatch.context() as env:
        # A task that loses a race is retried (the DAGs' retries=1) a second later, not after Airflow's 5 minutes.
        env.setenv("AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY", "1")
        with ThreadPoolExecutor(len(RUNS)) as pool:  # a home (and its migrated database) per run
            runners = dict(zip(RUNS, pool.map(
                lambda item: airflow_dags_test(root / f"home{item[0]}", item[1][0], store=store)[0],
                enumerate(RUNS.values()))))
        watch = ServingWatch(store)
        watch.thread.start()
        started = time.monotonic()
        with ThreadPoolExecutor(len(RUNS)) as pool:
            futures = {name: pool.submit(runners[name], date, conf) for name, (_, date, conf) in RUNS.items()}
            completed = {name: future.result() for name, future in futures.items()}
    seconds = time.monotonic() - started
    watch.done.set()
    watch.thread.join()
    watch.poll()
    results = {}
    for name, c in completed.items():
        log = c.stdout + c.stderr
        (root / f"{name}.log").write_text(log)
        results[name] = {"returncode": c.returncode, "log": log, "failures": task_failures(log)}
    print(f"{len(RUNS)} concurrent runs in {seconds:.0f}s; {watch.polls} polls of the serving prefixes (logs in {root})")
    for name, result in results.items():
        print(f"  {name}: exit {result['returncode']}; failed tries: {result['failures'] or 'none'}")
    return store, results, watch


def task_failures(log: str) -> list[str]:
    """The exception line of each failed task try in an ``airflow dags test`` log."""
    return [line.strip()[:300] for line in log.splitlines()
            if re.match(r"\s*(\w+\.)*\w+(Error|Exception): ", line)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_run_succeeds_and_a_failed_try_only_ever_lost_the_race_for_a_version(runs):
    """A try may fail only because another run published the version it chose (the exclusive rename found
    it taken); its retry then finds the model published. Anything else (two trainings writing one epoch
    backup: an HDF5 file lock refused, an optimizer that cannot be loaded from the other's weights) fails."""
    _, results, _ = runs
    for name, result in results.items():
        assert result["returncode"] == 0, f"{name}:\n{result['log'][-6000:]}"
        for failure in result["failures"]:
            assert any(message in failure for message in RACE_MESSAGES), f"{name}: {failure}"


def test_every_partition_is_whole_and_the_same_source_cuts_the_same_shards(runs):
    store, _, _ = runs
    shards = {}
    for dataset, date in {(dag, date) for dag, date, _ in RUNS.values()}:
        partition = store / "shards" / dataset / date
        manifest = json.loads((partition / "manifest.json").read_text())
        listed = {s["file"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
        assert {name: sha256(partition / name) for name in listed} == listed, f"{partition} is not whole"
        shards[dataset, date] = listed
        for stage, marker in (("raw", "manifest.json"), ("validated", "report.json"), ("preprocessing", "state.json")):
            assert (store / stage / dataset / date / marker).exists()
    # The penguins source is the same for both dates: two partitions written at once hold the same shards.
    assert shards["penguins", "2026-11-25"] == shards["penguins", "2026-11-26"]


def test_versions_never_collide_and_each_is_complete(runs):
    store, _, _ = runs
    for model, dates in (("penguins", {"2026-11-25", "2026-11-26"}), ("housing", {"2026-11-24"})):
        serving = store / "serving" / model
        versions = sorted(int(child.name) for child in serving.glob("*") if child.name.isdigit())
        by_date: dict[str, list[int]] = {}
        for version in versions:
            metadata = json.loads((serving / str(version) / "shardline.json").read_text())
            assert (serving / str(version) / "saved_model.pb").exists()
            assert metadata["version"] == version
            # Each version holds a model of its own day's run (run keys are the logical date).
            assert metadata["run"].startswith(day_of(version)), (version, metadata["run"])
            by_date.setdefault(day_of(version), []).append(version)
        assert set(by_date) == dates, versions
        # The two runs of 11-25 race for one version: the later export finds the model published (the same
        # weights) or takes the next second of the day; never one model twice in a day. (Two dates that train
        # the same weights at the same time may each publish them: neither export sees the other's yet.)
        for day_versions in by_date.values():
            weights = [json.loads((serving / str(v) / "shardline.json").read_text())["weights_sha256"]
                       for v in day_versions]
            assert len(set(weights)) == len(weights), f"one model published as several versions: {day_versions}"


def test_the_production_pointer_was_never_lost_and_points_at_a_published_version(runs):
    store, _, watch = runs
    assert watch.problems == []
    for model in ("penguins", "housing"):
        pointer = json.loads((store / "serving" / model / "production.json").read_text())
        version = store / "serving" / model / str(pointer["version"])
        assert (version / "saved_model.pb").exists(), pointer
    assert watch.production_seen == {"penguins", "housing"}
