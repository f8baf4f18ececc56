"""kill -9 anywhere: each step's command line is SIGKILLed at a chosen point, then run again as an Airflow retry would.

Each test runs the step once uninterrupted (the reference), then in a fresh store: starts it,
kills it (its whole process group, as a pre-empted pod dies) when a given file appears or
after a share of the reference's wall time, and runs it again. It asserts:

- the kill landed (the step was still running) and left its staging directory behind;
- while the killed run went, and after it, a reader saw the output complete or not at all:
  whenever the step's marker (manifest, report, state, ``saved_model.pb``) was there, every
  file of the reference was there with the reference's bytes;
- the retry succeeds, and its output is the reference's, file for file, byte for byte (the export's
  SavedModel files excepted: saving a model twice gives other bytes; its metadata, with the
  weights' SHA-256, must match);
- after the retry no ``shardline-*`` staging directory is left in the temp folder.

The shard step is also killed mid-upload to the moto S3 endpoint; training is killed after an
epoch's backup and must resume after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from benchmarks.data import housing_frame, housing_spec_fields
from conftest import ROOT
from processes import wait_for

ROWS = 300_000  # enough that the shard step's two processes are killed while they write


def run_step(step: str, *args: str, temp: Path, log_level: str = "WARNING") -> str:
    """``python -m tfjobs.<step> args`` with its own temp folder; returns its log."""
    done = subprocess.run([sys.executable, "-m", f"tfjobs.{step}", *args, "--log-level", log_level],
                          env=_env(temp), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def run_killed(step: str, *args: str, temp: Path, kill_when, reader, whole_group: bool = True,
               log: Path | None = None) -> int:
    """Start the step, call ``reader()`` all along, and SIGKILL its process group once ``kill_when()`` is true
    (with ``whole_group=False``, only the step's own process, as the OOM killer picks one). Returns its pid.
    With ``log``, the step logs at INFO into that file (for a ``kill_when`` that waits for a line)."""
    stderr = log.open("w") if log else subprocess.PIPE
    process = subprocess.Popen([sys.executable, "-m", f"tfjobs.{step}", *args, "--log-level",
                                "INFO" if log else "WARNING"],
                               env=_env(temp), cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        while not kill_when():
            reader()
            if process.poll() is not None:
                output = log.read_text() if log else process.stderr.read()
                pytest.fail(f"tfjobs.{step} ended (exit code {process.returncode}) before the kill point: "
                            f"{output[-2000:]}")
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL) if not whole_group else os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        (stderr if log else process.stderr).close()
    reader()
    return process.pid


def _env(temp: Path) -> dict[str, str]:
    temp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}


def files(root: Path) -> dict[str, str]:
    """Every file under ``root``: relative path -> SHA-256."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def complete_or_absent(output: Path, marker: str, reference: dict[str, str]):
    """A reader: once ``marker`` is there, the output must be the reference, byte for byte."""
    def read():
        if (output / marker).exists():
            assert files(output) == reference, f"{output / marker} was readable over an incomplete output"
    return read


def appears(folder: Path, pattern: str, size: int = 1):
    """Whether a file matching ``pattern`` holds ``size`` bytes or more under ``folder``."""
    return lambda: any(p.stat().st_size >= size for p in folder.glob(pattern))


def staged_bytes(temp: Path) -> int:
    return sum(p.stat().st_size for p in temp.glob("shardline-*/**/*") if p.is_file())


@pytest.fixture(scope="module")
def housing(tmp_path_factory):
    """A spec file over a CSV of synthetic housing rows, and the steps' reference outputs."""
    root = tmp_path_factory.mktemp("housing")
    housing_frame(ROWS).to_csv(root / "housing.csv", index=False)
    fields = housing_spec_fields({"train": 4, "eval": 1, "test": 1})
    fields["source"] = {"kind": "csv", "uri": str(root / "housing.csv")}
    (root / "spec.yaml").write_text(yaml.safe_dump(fields))
    data = SimpleNamespace(spec=str(root / "spec.yaml"), reference=root / "reference", times={})
    data.args = lambda store: {
        "fetch": ["--output", f"{store}/raw"],
        "validate": ["--raw", f"{store}/raw", "--output", f"{store}/validated"],
        "shard": ["--validated", f"{store}/validated", "--output", f"{store}/shards", "--processes", "2"],
        "adapt": ["--shards", f"{store}/shards/manifest.json", "--output", f"{store}/preprocessing"],
    }
    for step, args in data.args(data.reference).items():
        start = time.monotonic()
        run_step(step, "--spec", data.spec, *args, temp=root / "temp")
        data.times[step] = time.monotonic() - start
    return data


def copy_inputs(reference: Path, store: Path, *outputs: str) -> None:
    for output in outputs:
        subprocess.run(["cp", "-r", str(reference / output), str(store / output)], check=True)


@pytest.mark.parametrize(("step", "inputs", "output", "marker", "kill_point"), [
    # fetch: while it copies, hashes and counts the delivery in its staging directory
    ("fetch", [], "raw", "manifest.json", "shardline-*/data.csv"),
    # validate: while it writes the Parquet file in staging (a row group or more written)
    ("validate", ["raw"], "validated", "report.json", ("shardline-*/data.parquet", 1 << 20)),
    # shard: while the second process writes its part of a shard
    ("shard", ["raw", "validated"], "shards", "manifest.json", "shardline-*/train/*.part1"),
    # adapt: half-way through its reference wall time (it stages nothing: the shards are local)
    ("adapt", ["raw", "validated", "shards"], "preprocessing", "state.json", None),
])
def test_a_killed_step_reruns_to_the_same_bytes(housing, tmp_path, step, inputs, output, marker, kill_point):
    store, temp = tmp_path / "store", tmp_path / "temp"
    store.mkdir()
    copy_inputs(housing.reference, store, *inputs)
    reference = files(housing.reference / output)
    args = ["--spec", housing.spec, *housing.args(store)[step]]
    if kill_point:
        kill_when = appears(temp, *kill_point) if isinstance(kill_point, tuple) else appears(temp, kill_point)
    else:
        deadline = time.monotonic() + housing.times[step] / 2
        kill_when = lambda: time.monotonic() > deadline  # noqa: E731
    reader = complete_or_absent(store / output, marker, reference)

    run_killed(step, *args, temp=temp, kill_when=kill_when, reader=reader)

    assert not (store / output / marker).exists()
    left = staged_bytes(temp)
    assert left > 0 or not kill_point, "the kill should have left a staging directory behind"
    run_step(step, *args, temp=temp)
    assert files(store / output) == reference
    assert list(temp.glob("shardline-*")) == [], "a staging directory is left after the retry"
    print(f"{step}: killed with {left} B staged; none left after the retry")


def test_the_shard_steps_workers_die_with_it(housing, tmp_path):
    """Only the job's process is killed (the OOM killer's pick): its worker must not write on, or wait for work,
    for good, holding the staging directory."""
    store, temp = tmp_path / "store", tmp_path / "temp"
    store.mkdir()
    copy_inputs(housing.reference, store, "raw", "validated")
    args = ["--spec", housing.spec, *housing.args(store)["shard"]]
    reference = files(housing.reference / "shards")

    group = run_killed("shard", *args, temp=temp, kill_when=appears(temp, "shardline-*/train/*.part1"),
                       reader=complete_or_absent(store / "shards", "manifest.json", reference), whole_group=False)
    wait_for(lambda: not _alive(group), 30, "the killed shard job's worker to exit", interval_s=0.05)
    run_step("shard", *args, temp=temp)
    assert files(store / "shards") == reference
    assert list(temp.glob("shardline-*")) == []


def _alive(group: int) -> bool:
    """Whether a process of the group is still running (a zombie waiting for its reaper is not)."""
    states = subprocess.run(["ps", "-o", "stat=", "-g", str(group)], capture_output=True, text=True).stdout.split()
    return any(not state.startswith("Z") for state in states)


@pytest.mark.slow
def test_a_killed_export_publishes_no_partial_version_and_reruns(penguins_pipeline, tmp_path):
    """Killed after the SavedModel is written in staging (its Keras file and the skew check to come);
    TF Serving's version scan must see no version, then the retry's whole one."""
    run, temp = penguins_pipeline, tmp_path / "temp"
    version = "1764028800"
    args = lambda serving: ["--spec", str(ROOT / "include" / "penguins.yaml"),  # noqa: E731
                            "--model", run.train.model_uri, "--state", run.train.state_uri,
                            "--shards", run.shard.manifest_uri, "--metrics", run.evaluate.metrics_uri,
                            "--serving", str(serving), "--version", version]
    run_step("export", *args(tmp_path / "reference"), temp=temp)
    reference = files(tmp_path / "reference")
    serving = tmp_path / "serving"

    def version_scan():  # what TF Serving would load: every child whose name is an integer
        for child in serving.glob("*"):
            if child.name.isdigit():
                assert files(child).keys() == {k.partition("/")[2] for k in reference}, f"{child} is partial"

    run_killed("export", *args(serving), temp=temp, kill_when=appears(temp, f"shardline-*/{version}/saved_model.pb"),
               reader=version_scan)
    assert not (serving / version).exists()
    left = staged_bytes(temp)
    run_step("export", *args(serving), temp=temp)
    retried = files(serving)
    assert retried.keys() == reference.keys()
    # A SavedModel is not byte-reproducible (saving the same model twice gives other bytes); its
    # metadata, which holds the weights' SHA-256 and the skew check's result, is.
    assert retried[f"{version}/shardline.json"] == reference[f"{version}/shardline.json"]
    print(f"export: killed with {left} B staged; none left after the retry")
    assert list(temp.glob("shardline-*")) == []


def backed_up_epochs(temp: Path) -> int:
    """How many epochs the training's backup (in the temp folder ``temp``) holds."""
    done = next(temp.glob("shardline-train-backup-*/training_metadata.json"), None)
    try:
        return json.loads(done.read_text())["epoch"] if done else 0
    except ValueError:  # being written
        return 0


def test_a_killed_training_resumes_after_its_last_finished_epoch(housing, tmp_path):
    """Killed once epoch 3's backup is written, the retry starts at the epoch after the last backed-up one."""
    store, temp = tmp_path / "store", tmp_path / "temp"
    args = ["--spec", housing.spec, "--shards", f"{housing.reference}/shards/manifest.json",
            "--state", f"{housing.reference}/preprocessing/state.json", "--output", str(store / "train"),
            "--set", "epochs=6", "--set", "batch_size=2048", "--set", "early_stopping_patience=6"]

    started = time.monotonic()
    run_killed("train", *args, temp=temp, kill_when=lambda: backed_up_epochs(temp) >= 3,
               reader=complete_or_absent(store / "train", "training.json", {}))
    killed_after = time.monotonic() - started
    resumed_from = backed_up_epochs(temp)
    started = time.monotonic()
    log = run_step("train", *args, temp=temp, log_level="INFO")
    retry_s = time.monotonic() - started

    epochs = re.findall(r"epoch (\d+)/6", log)
    assert epochs == [str(n) for n in range(resumed_from + 1, 7)], log[-3000:]
    summary = json.loads((store / "train" / "training.json").read_text())
    assert summary["epochs_run"] == 6
    assert len(json.loads((store / "train" / "history.json").read_text())["loss"]) == 6
    assert list(temp.glob("shardline-*")) == [], "the backup and staging directories are removed on success"
    print(f"train: killed at {killed_after:.1f}s after epoch {resumed_from}'s backup; "
          f"the retry ran epochs {epochs[0]}-6 in {retry_s:.1f}s")


def test_a_backup_neither_copy_of_which_reads_fails_one_try_and_the_next_trains_from_the_start(housing, tmp_path):
    """Keras reads the older copy when the newer is unreadable; with both unreadable (a full disk, a bad
    block), the try fails naming the backup and removes it, so the next try trains every epoch instead of
    every retry failing on the same files."""
    store, temp = tmp_path / "store", tmp_path / "temp"
    args = ["--spec", housing.spec, "--shards", f"{housing.reference}/shards/manifest.json",
            "--state", f"{housing.reference}/preprocessing/state.json", "--output", str(store / "train"),
            "--set", "epochs=4", "--set", "batch_size=2048", "--set", "early_stopping_patience=4"]
    run_killed("train", *args, temp=temp, kill_when=lambda: backed_up_epochs(temp) >= 2,
               reader=complete_or_absent(store / "train", "training.json", {}))
    [backup] = temp.glob("shardline-train-backup-*")
    copies = [backup / "latest.weights.h5", backup / "latest.weights.h5.bkp"]
    assert all(c.exists() for c in copies), sorted(p.name for p in backup.iterdir())
    for copy in copies:
        copy.write_bytes(copy.read_bytes()[:100])  # truncated

    failed = subprocess.run([sys.executable, "-m", "tfjobs.train", *args], env=_env(temp), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert f"UnreadableBackupError: The training backup in {backup} cannot be read" in failed.stderr, \
        failed.stderr[-3000:]
    assert not backup.exists() and not (store / "train" / "training.json").exists()

    log = run_step("train", *args, temp=temp, log_level="INFO")
    assert re.findall(r"epoch (\d+)/4", log) == ["1", "2", "3", "4"], log[-3000:]
    assert json.loads((store / "train" / "training.json").read_text())["epochs_run"] == 4


@pytest.fixture(scope="module")
def early_stopped(housing):
    """Training that EarlyStopping stops at a known epoch, uninterrupted (the reference).

    No shuffling and deterministic kernels: every epoch sees the rows in the same order, so a resumed
    run trains the uninterrupted run's epochs again exactly. Adam at 0.05 overfits the housing rows
    early (on the development VM: the best val_loss is epoch 5's and, with patience 3, training stops
    after epoch 8); the test takes the epochs from this run.
    """
    ref = housing.reference
    args = lambda output: [  # noqa: E731
        "--spec", housing.spec, "--shards", f"{ref}/shards/manifest.json",
        "--state", f"{ref}/preprocessing/state.json", "--output", str(output), "--set", "epochs=20",
        "--set", "batch_size=2048", "--set", "learning_rate=0.05", "--set", "early_stopping_patience=3",
        "--set", "shuffle_buffer=0", "--set", "deterministic=true"]
    output = ref.parent / "early_stopped"
    log = run_step("train", *args(output), temp=ref.parent / "temp", log_level="INFO")
    summary = json.loads((output / "training.json").read_text())
    best, stopped = summary["best_epoch"], summary["epochs_run"]
    assert stopped == best + 3 < 20, log[-3000:]  # stopped early, patience epochs after the best
    return SimpleNamespace(args=args, output=output, summary=summary, best=best, stopped=stopped,
                           history=json.loads((output / "history.json").read_text()))


@pytest.mark.parametrize("killed", ["past the best epoch", "after the stop"])
def test_early_stopping_counts_on_after_a_resume(early_stopped, tmp_path, killed):
    """Killed once an epoch past the best is backed up (its wait count at 1 of 3), or once EarlyStopping has
    stopped (while the model is saved and published), the retry stops where the uninterrupted run stopped
    (after epoch 8 on the development VM) and keeps the best epoch's weights (epoch 5's). Were its patience to
    count again from the resume, it would train on to epoch 10 or later, and restore the best of the resumed
    epochs."""
    import keras
    import numpy as np

    import tfjobs.modeling.layers  # noqa: F401 (registers the model's layers for loading)

    store, temp = tmp_path / "store", tmp_path / "temp"
    args = early_stopped.args(store / "train")
    best, stopped = early_stopped.best, early_stopped.stopped
    kill_at = best + 1 if killed == "past the best epoch" else stopped
    run_killed("train", *args, temp=temp, kill_when=lambda: backed_up_epochs(temp) >= kill_at,
               reader=complete_or_absent(store / "train", "training.json", {}))
    assert not (store / "train" / "training.json").exists(), "the kill landed after the training was published"
    resumed_from = backed_up_epochs(temp)
    log = run_step("train", *args, temp=temp, log_level="INFO")

    assert re.findall(r"epoch (\d+)/20", log) == [str(n) for n in range(resumed_from + 1, stopped + 1)], log[-3000:]
    summary = json.loads((store / "train" / "training.json").read_text())
    assert (summary["best_epoch"], summary["epochs_run"]) == (best, stopped)
    assert summary["metrics"] == early_stopped.summary["metrics"]
    assert json.loads((store / "train" / "history.json").read_text()) == early_stopped.history
    trained = [keras.saving.load_model(path / "training_model.keras", compile=False).get_weights()
               for path in (early_stopped.output, store / "train")]
    assert all(np.array_equal(a, b) for a, b in zip(*trained, strict=True)), "the retry kept other weights"
    ran = f"epochs {resumed_from + 1}-{stopped}" if resumed_from < stopped else "no epoch"
    print(f"train: killed {killed} (epoch {resumed_from} backed up); the retry ran {ran}, stopped after epoch "
          f"{stopped} and kept epoch {best}'s weights, as uninterrupted")


@pytest.fixture(scope="module")
def housing_model(housing):
    """A model trained for two epochs on the housing shards, and its evaluation (the reference)."""
    ref = housing.reference
    run_step("train", "--spec", housing.spec, "--shards", f"{ref}/shards/manifest.json",
             "--state", f"{ref}/preprocessing/state.json", "--output", f"{ref}/train",
             "--set", "epochs=2", "--set", "batch_size=2048", temp=ref.parent / "temp")
    args = lambda output: ["--spec", housing.spec, "--model", f"{ref}/train/training_model.keras",  # noqa: E731
                           "--state", f"{ref}/train/state.json", "--shards", f"{ref}/shards/manifest.json",
                           "--output", str(output)]
    start = time.monotonic()
    run_step("evaluate", *args(ref / "evaluate"), temp=ref.parent / "temp")
    return SimpleNamespace(args=args, reference=files(ref / "evaluate"), seconds=time.monotonic() - start,
                           housing=housing)


def test_a_killed_evaluation_reruns_to_the_same_metrics(housing_model, tmp_path):
    """Killed while it scores the test split (50,000 rows): no metrics.json (the blessing) until the whole
    report is there, and the retry writes the reference's, byte for byte (the evaluation is deterministic)."""
    store, temp, log = tmp_path / "store", tmp_path / "temp", tmp_path / "evaluate.log"
    args = housing_model.args(store / "evaluate")
    assert set(housing_model.reference) == {"metrics.json"}
    reader = complete_or_absent(store / "evaluate", "metrics.json", housing_model.reference)

    started = time.monotonic()
    run_killed("evaluate", *args, temp=temp, log=log, reader=reader,
               kill_when=lambda: "Scoring candidate on the test split" in log.read_text())
    killed_after = time.monotonic() - started
    assert not (store / "evaluate" / "metrics.json").exists(), "the kill landed after the evaluation was written"
    run_step("evaluate", *args, temp=temp)
    assert files(store / "evaluate") == housing_model.reference
    assert list(temp.glob("shardline-*")) == []
    print(f"evaluate: killed {killed_after:.1f}s in (while scoring; a whole run takes {housing_model.seconds:.1f}s); "
          "the retry wrote the reference's metrics.json")


def test_a_shard_run_killed_mid_upload_to_s3_reruns_to_the_same_objects(housing, tmp_path, monkeypatch):
    """On the moto S3 endpoint: killed once a shard object is uploaded and before the manifest is."""
    from s3_server import REGION, moto_s3

    temp = tmp_path / "temp"
    with moto_s3() as endpoint:
        client = endpoint.client()
        output = f"s3://{endpoint.bucket}/shards"

        def objects() -> dict[str, str]:
            listed = client.list_objects_v2(Bucket=endpoint.bucket, Prefix="shards/").get("Contents", [])
            return {o["Key"][len("shards/"):]: hashlib.sha256(
                client.get_object(Bucket=endpoint.bucket, Key=o["Key"])["Body"].read()).hexdigest() for o in listed}

        def uploaded_a_shard() -> bool:
            return client.list_objects_v2(Bucket=endpoint.bucket, Prefix="shards/train/").get("KeyCount", 0) > 0

        def reader():
            if client.list_objects_v2(Bucket=endpoint.bucket, Prefix="shards/manifest.json").get("KeyCount", 0):
                assert objects() == reference, "the manifest was readable over incomplete shards"

        reference = files(housing.reference / "shards")
        args = ["--spec", housing.spec, "--validated", f"{housing.reference}/validated", "--output", output,
                "--processes", "2", "--s3-endpoint-url", endpoint.url]
        for name, value in {"AWS_ACCESS_KEY_ID": endpoint.access_key, "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
                            "AWS_DEFAULT_REGION": REGION}.items():
            monkeypatch.setenv(name, value)  # for the step's processes
        run_killed("shard", *args, temp=temp, kill_when=uploaded_a_shard, reader=reader)
        assert "manifest.json" not in objects()
        run_step("shard", *args, temp=temp)
        assert objects() == reference
    assert list(temp.glob("shardline-*")) == []


class Freeze:
    """An ``on_request`` for :class:`s3_server.FaultyProxy`: forwards requests until ``after`` PUTs that
    ``match(path, headers)`` have gone through, then holds every request (the client frozen mid-publish,
    as a pre-empted pod's) until ``drop()``, which drops the held connections unanswered."""

    def __init__(self, match, after: int):
        self.match, self.after, self.seen = match, after, 0
        self.lock, self.frozen, self.dropped = threading.Lock(), threading.Event(), threading.Event()

    def __call__(self, method, path, headers):
        with self.lock:
            if not self.frozen.is_set():
                if method != "PUT" or not self.match(path, headers):
                    return None
                self.seen += 1
                if self.seen <= self.after:
                    return None
                self.frozen.set()
        self.dropped.wait(120)
        return "drop"

    def drop(self):
        self.dropped.set()


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["upload", "copy"])
def test_an_export_killed_mid_publish_to_s3_shows_no_partial_version_and_reruns(
        penguins_pipeline, tmp_path, monkeypatch, phase):
    """On the moto S3 endpoint, the export is killed between two of the SavedModel's objects: while it
    uploads them (to its hidden staging prefix), or while it copies them into ``<version>/`` on the server.
    A TF Serving-like version scan (integer directories holding ``saved_model.pb``) must never see a
    version without all its files; the retry publishes the same weights; it leaves no staging of its own."""
    from s3_server import REGION, FaultyProxy, moto_s3

    run, temp = penguins_pipeline, tmp_path / "temp"
    version = "1764028800"
    published = Path(run.export.version_uri)  # the same model, exported to a local store by the fixture
    reference_files = set(files(published))
    weights = json.loads((published / "shardline.json").read_text())["weights_sha256"]
    copied_into_a_version = re.compile(r"/serving/penguins/\d+/")
    match = {
        "upload": lambda path, headers: "/.staging-" in path and "x-amz-copy-source" not in headers,
        "copy": lambda path, headers: bool(copied_into_a_version.search(path)) and "x-amz-copy-source" in headers,
    }[phase]
    with moto_s3() as endpoint:
        client = endpoint.client()
        serving = f"s3://{endpoint.bucket}/serving/penguins"
        for name, value in {"AWS_ACCESS_KEY_ID": endpoint.access_key, "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
                            "AWS_DEFAULT_REGION": REGION}.items():
            monkeypatch.setenv(name, value)  # for the step's processes

        def listing() -> dict[str, list[str]]:
            """Each child of the serving prefix: the keys under it."""
            children: dict[str, list[str]] = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=endpoint.bucket,
                                                                         Prefix="serving/penguins/"):
                for item in page.get("Contents", []):
                    child, _, rest = item["Key"][len("serving/penguins/"):].partition("/")
                    children.setdefault(child, []).append(rest)
            return children

        partial_dirs_seen = set()

        def version_scan():  # TF Serving's view: integer children; a version is one with saved_model.pb
            for child, keys in listing().items():
                if child.isdigit() and "saved_model.pb" in keys:
                    assert set(keys) == reference_files, f"version {child} was loadable while incomplete: {keys}"
                elif child.isdigit():
                    partial_dirs_seen.add(child)

        args = lambda url: ["--spec", str(ROOT / "include" / "penguins.yaml"),  # noqa: E731
                            "--model", run.train.model_uri, "--state", run.train.state_uri,
                            "--shards", run.shard.manifest_uri, "--metrics", run.evaluate.metrics_uri,
                            "--serving", serving, "--version", version, "--s3-endpoint-url", url]
        freeze = Freeze(match, after=2)
        with FaultyProxy(endpoint.url, share=0, on_request=freeze) as proxy:
            try:
                run_killed("export", *args(proxy.url), temp=temp, kill_when=freeze.frozen.is_set,
                           reader=version_scan)
            finally:
                freeze.drop()
        after_kill = listing()
        assert not any(child.isdigit() and "saved_model.pb" in keys for child, keys in after_kill.items())
        staged_after_kill = {child for child in after_kill if child.startswith(".staging-")}
        if phase == "upload":
            assert staged_after_kill and not any(child.isdigit() for child in after_kill), after_kill

        run_step("export", *args(endpoint.url), temp=temp)
        version_scan()
        after_retry = listing()
        versions = {child for child in after_retry if child.isdigit()}
        assert versions == {version}, after_retry
        metadata = json.loads(client.get_object(Bucket=endpoint.bucket,
                                                Key=f"serving/penguins/{version}/shardline.json")["Body"].read())
        assert metadata["weights_sha256"] == weights
        left = {child for child in after_retry if not child.isdigit()}
        # The retry removes its own staging prefix; a killed upload's stays (TF Serving skips it: its name is
        # not an integer) until the bucket's lifecycle rule on serving/<model>/.staging- expires it.
        assert left == staged_after_kill, f"the retry left its staging behind: {left - staged_after_kill}"
    assert list(temp.glob("shardline-*")) == []
    print(f"export on S3, killed mid-{phase}: integer directories without saved_model.pb seen: "
          f"{sorted(partial_dirs_seen) or 'none'}; staging prefixes left after the retry: {sorted(left) or 'none'}")


def test_two_trainings_of_one_run_at_once_train_it_once(housing, tmp_path):
    """The same date's scheduled run and a manual trigger train the same model into the same output at once:
    they must not share the epoch backup (each would resume from the other's half-written weights). The
    second waits for the first, then finds the training up to date."""
    store, temp = tmp_path / "store", tmp_path / "temp"
    args = ["--spec", housing.spec, "--shards", f"{housing.reference}/shards/manifest.json",
            "--state", f"{housing.reference}/preprocessing/state.json", "--output", str(store / "train"),
            "--set", "epochs=3", "--set", "batch_size=2048", "--log-level", "INFO"]
    processes = [subprocess.Popen([sys.executable, "-m", "tfjobs.train", *args], env=_env(temp), cwd=ROOT,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    logs = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    trained = [log for log in logs if "epoch 1/3" in log]
    waited = [log for log in logs if "training the same model into the same output; waiting" in log]
    assert len(trained) == 1 and len(waited) == 1 and "not retraining" in waited[0], "\n".join(logs)
    assert json.loads((store / "train" / "training.json").read_text())["epochs_run"] == 3
    assert list(temp.glob("shardline-*")) == [] and list(temp.glob(".shardline-*")) == []


@pytest.fixture(scope="module")
def s3_endpoint():
    from s3_server import moto_s3

    with moto_s3() as endpoint:
        yield endpoint


@pytest.mark.parametrize(("step", "output", "marker", "kill_point"), [
    ("fetch", "raw", "manifest.json", "shardline-*/data.csv"),
    ("validate", "validated", "report.json", ("shardline-*/data.parquet", 1 << 20)),
    ("adapt", "preprocessing", "state.json", None),
    ("train", "train", "training.json", "epoch 2 backed up"),
    ("evaluate", "evaluate", "metrics.json", "scoring"),
])
def test_a_step_killed_on_s3_reruns_to_the_same_objects(housing_model, s3_endpoint, tmp_path, monkeypatch,
                                                        step, output, marker, kill_point):
    """Each step writing to the moto S3 endpoint (its inputs the local reference's), killed at the local test's
    point: no reader sees the marker object over an incomplete output, and the retry writes the reference's
    objects byte for byte (training, whose weights are not reproducible, resumes and finishes instead)."""
    from s3_server import REGION

    housing, endpoint = housing_model.housing, s3_endpoint
    client, temp, prefix = endpoint.client(), tmp_path / "temp", f"{step}-{tmp_path.name}"
    for name, value in {"AWS_ACCESS_KEY_ID": endpoint.access_key, "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
                        "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(name, value)  # for the step's processes
    reference = {} if step == "train" else files(housing.reference / output)
    ref = housing.reference
    inputs = {**housing.args(ref),
              "train": ["--shards", f"{ref}/shards/manifest.json", "--state", f"{ref}/preprocessing/state.json",
                        "--set", "epochs=4", "--set", "batch_size=2048", "--set", "early_stopping_patience=4"],
              "evaluate": housing_model.args("")[2:-2]}[step]
    inputs = [arg for arg in inputs if arg not in ("--output", f"{ref}/{output}")]
    args = ["--spec", housing.spec, *inputs, "--output", f"s3://{endpoint.bucket}/{prefix}",
            "--s3-endpoint-url", endpoint.url]

    def objects() -> dict[str, str]:
        listed = client.list_objects_v2(Bucket=endpoint.bucket, Prefix=f"{prefix}/").get("Contents", [])
        return {o["Key"][len(prefix) + 1:]: hashlib.sha256(
            client.get_object(Bucket=endpoint.bucket, Key=o["Key"])["Body"].read()).hexdigest() for o in listed}

    def reader():
        if client.list_objects_v2(Bucket=endpoint.bucket, Prefix=f"{prefix}/{marker}").get("KeyCount", 0):
            assert objects() == reference, f"{marker} was readable over an incomplete output"

    log = tmp_path / "step.log"
    if kill_point == "scoring":
        kill_when = lambda: "Scoring candidate on the test split" in log.read_text()  # noqa: E731
    elif kill_point == "epoch 2 backed up":
        kill_when = lambda: backed_up_epochs(temp) >= 2  # noqa: E731
    elif kill_point:
        kill_when = appears(temp, *kill_point) if isinstance(kill_point, tuple) else appears(temp, kill_point)
    else:
        deadline = time.monotonic() + housing.times[step] / 2
        kill_when = lambda: time.monotonic() > deadline  # noqa: E731
    run_killed(step, *args, temp=temp, kill_when=kill_when, reader=reader,
               **({"log": log} if kill_point == "scoring" else {}))
    assert marker not in objects(), "the kill landed after the output was published"
    retry_log = run_step(step, *args, temp=temp, log_level="INFO")
    if step == "train":
        assert re.findall(r"epoch (\d+)/4", retry_log)[0] == "3", retry_log[-3000:]  # resumed after epoch 2
        summary = json.loads(client.get_object(Bucket=endpoint.bucket, Key=f"{prefix}/training.json")["Body"].read())
        assert summary["epochs_run"] == 4
    else:
        assert objects() == reference
    assert list(temp.glob("shardline-*")) == [], "a staging directory is left after the retry"
