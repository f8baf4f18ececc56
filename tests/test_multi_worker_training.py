"""Training beyond one machine: two workers on loopback under MultiWorkerMirroredStrategy (CPU)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from processes import free_ports, stop_process_group
from tfjobs.storage.store import read_json, store_for
from tfjobs.train import cluster_task


def tf_config(workers, task_type="worker", index=0, chief=()):
    cluster = {"worker": list(workers), **({"chief": list(chief)} if chief else {})}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_cluster_task_names_the_chief():
    assert cluster_task("") is None
    assert cluster_task(tf_config(["a:1"])) is None  # one task is no cluster
    first, second = cluster_task(tf_config(["a:1", "b:1"])), cluster_task(tf_config(["a:1", "b:1"], index=1))
    assert (first.is_chief, second.is_chief) == (True, False)
    with_chief = cluster_task(tf_config(["a:1"], index=0, chief=["c:1"]))
    assert not with_chief.is_chief and cluster_task(tf_config(["a:1"], "chief", 0, chief=["c:1"])).is_chief


@pytest.mark.parametrize(
    "config, message",
    [("{not json", "TF_CONFIG must be JSON"), ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG must be JSON"),
     (tf_config(["a:1", "b:1"], index=2), "task worker:2 is not in its cluster")],
)
def test_malformed_tf_config_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        cluster_task(config)


@pytest.mark.slow
def test_two_workers_train_one_model_and_only_the_chief_publishes(penguins_pipeline, tmp_path):
    run = penguins_pipeline
    output = str(tmp_path / "runs" / "penguins" / "two-workers" / "train")
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    command = [
        sys.executable, "-m", "tfjobs.train", "--spec", str(ROOT / "include" / "penguins.yaml"),
        "--shards", run.shard.manifest_uri, "--state", run.adapt.state_uri, "--output", output,
        "--set", "epochs=12", "--set", "early_stopping_patience=12",
    ]
    processes = [
        subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, "TF_CONFIG": tf_config(workers, index=index), "PYTHONPATH": str(ROOT)},
        )
        for index in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=900) for process in processes]
    finally:
        for process in processes:
            stop_process_group(process)
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-5000:]
    (chief_out, chief_log), (worker_out, worker_log) = outputs

    assert "MultiWorkerMirroredStrategy" in chief_log and "num_workers = 2" in chief_log
    # One replicated model: both workers log the same metrics for every epoch.
    epochs = [[line.split("epoch ", 1)[1].rsplit(" (", 1)[0] for line in log.splitlines() if " epoch " in line]
              for log in (chief_log, worker_log)]
    assert epochs[0] and epochs[0] == epochs[1]

    # Only the chief published; the worker's copy went to a throwaway directory.
    assert "Published the training outputs" in chief_log and "Published" not in worker_log
    assert "Task worker:1 is not the chief" in worker_log
    assert (json.loads(chief_out)["rewritten"], json.loads(worker_out)["rewritten"]) == (True, False)
    summary = read_json(output + "/training.json")
    assert summary["cluster_task"] == "worker:0"
    names = {uri[len(output) + 1:] for uri in store_for(output).list(output)}
    assert {"training_model.keras", "checkpoints/best.weights.h5", "history.json", "training.json"} <= names

    # It converged.
    history = read_json(output + "/history.json")
    assert history["loss"][-1] < history["loss"][0] / 3
    assert max(history["val_accuracy"]) >= 0.9
