"""Local staging directories: a killed job's directory is reclaimed by the next one; a live one's never is."""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT
from processes import wait_for
from tfjobs.storage.store import StagingDir, reclaim_staging_dirs, staging_dir

# Makes a staging directory holding 1 MiB, prints its path, then waits to be killed. With "worker",
# a spawned process holds the directory too (as the shard step's workers do) and prints its pid.
OWNER = """
import multiprocessing, sys, time
from tfjobs.storage.store import StagingDir, holding_staging_dir

def work(path, ready):
    with holding_staging_dir(path):
        ready.set()
        time.sleep(600)

if __name__ == "__main__":
    staging = StagingDir()
    (staging.path / "part").write_bytes(bytes(1 << 20))
    if sys.argv[1:] == ["worker"]:
        ready = multiprocessing.get_context("spawn").Event()
        worker = multiprocessing.get_context("spawn").Process(target=work, args=(str(staging.path), ready))
        worker.start()
        if not ready.wait(60):
            sys.exit("the worker did not start")
        print(worker.pid, flush=True)
    print(staging.path, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    """The temp folder, for this process and its children: a fresh one, so only the test's directories are in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    (tmp_path / "owner.py").write_text(OWNER)  # a file: spawned processes re-import the main module
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return folder


def start_owner(temp_folder: Path, *args: str) -> tuple[subprocess.Popen, list[str]]:
    process = subprocess.Popen([sys.executable, str(temp_folder.parent / "owner.py"), *args],
                               stdout=subprocess.PIPE, text=True)
    lines = [process.stdout.readline().strip() for _ in range(1 + len(args))]
    assert all(lines), f"the owner process failed (exit code {process.poll()})"
    return process, lines


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_killed_owners_directory_is_reclaimed_and_a_live_ones_is_not(temp_folder):
    killed, _ = start_owner(temp_folder)
    live, (live_dir,) = start_owner(temp_folder)
    try:
        kill(killed)
        with staging_dir() as mine:
            names = {p.name for p in temp_folder.iterdir()}
            assert names == {mine.name, f"{mine.name}.lock", Path(live_dir).name, f"{Path(live_dir).name}.lock"}
            assert (Path(live_dir) / "part").stat().st_size == 1 << 20
    finally:
        kill(live)
    assert reclaim_staging_dirs() == [Path(live_dir)]
    assert list(temp_folder.iterdir()) == []


def test_a_worker_holding_the_directory_keeps_it_after_its_owner_is_killed(temp_folder):
    owner, (worker_pid, path) = start_owner(temp_folder, "worker")
    kill(owner)
    assert reclaim_staging_dirs() == []  # the orphaned worker may still be writing
    os.kill(int(worker_pid), signal.SIGKILL)
    wait_for(reclaim_staging_dirs, 10, f"{path} to be reclaimed once its worker is dead", interval_s=0.05)
    assert list(temp_folder.iterdir()) == []


def test_other_shardline_folders_are_left_alone(temp_folder):
    (temp_folder / "shardline-airflow-x").mkdir()
    (temp_folder / "shardline-store").mkdir()
    StagingDir().cleanup()
    assert sorted(p.name for p in temp_folder.iterdir()) == ["shardline-airflow-x", "shardline-store"]
