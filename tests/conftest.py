"""Shared fixtures. Airflow's home and the object store live in temporary directories."""

from __future__ import annotations

import contextlib
import http.server
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HOUSING_CSV = SHARED / "datasets" / "housing" / "housing.csv"
# What the tests fetch through Airflow besides the store: the shared datasets and the files they write
# in temporary directories ([shardline] allowed_source_prefixes; the default allows neither).
TEST_SOURCE_PREFIXES = f"{SHARED / 'datasets'} {tempfile.gettempdir()}"

# Before anything imports Airflow: a throwaway AIRFLOW_HOME, and the project on sys.path.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="shardline-airflow-"))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES"] = TEST_SOURCE_PREFIXES
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

from tfjobs.spec import load_spec, parse_spec  # noqa: E402


@pytest.fixture(scope="session")
def penguins_spec():
    return load_spec(ROOT / "include" / "penguins.yaml")


def tiny_spec(**overrides):
    """A three-feature classification spec for small fixtures."""
    raw = {
        "name": "tiny",
        "source": {"kind": "csv", "uri": "unused.csv"},
        "label": {"name": "kind", "task": "classification", "classes": ["a", "b"]},
        "features": {
            "size": {"kind": "numeric"},
            "colour": {"kind": "categorical"},
            "batch": {"kind": "integer_categorical"},
        },
        "split": {"train": 0.6, "eval": 0.2, "test": 0.2},
        "max_quarantine_fraction": 0.5,
    }
    raw.update(overrides)
    return parse_spec(raw)


def airflow_dags_test(home: Path, dag_id: str, dags_folder: Path = ROOT / "dags", store: Path | None = None):
    """``dags_test(date, conf=None)``: ``airflow dags test <dag_id>`` in a subprocess on a fresh SQLite home.

    Returns the runner and the object store's root (``store``, by default ``<home>/store``; several homes
    may share one, as the workers of several Airflow deployments would).
    """
    import json
    import subprocess

    store = store or home / "store"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__SHARDLINE__STORE_URI": str(store),
        "AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES": TEST_SOURCE_PREFIXES,
        "PYTHONPATH": str(ROOT),
    }
    airflow_bin = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow_bin, "db", "migrate"], env=env, check=True, capture_output=True)

    def dags_test(date, conf=None):
        command = [airflow_bin, "dags", "test", dag_id, date]
        if conf:
            command += ["--conf", json.dumps(conf)]
        return subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, check=False)

    return dags_test, store


@contextlib.contextmanager
def loopback_http():
    """An HTTP server on 127.0.0.1 that serves ``files`` (path -> bytes), answers ``redirects``
    (path -> URL) with 302, anything else with 404, and records each request as
    ``(method, path, headers)`` in ``requests``. ``url(path)`` is the full URL of a path."""
    state = SimpleNamespace(files={}, redirects={}, requests=[])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.answer(with_body=True)

        def do_HEAD(self):
            self.answer(with_body=False)

        def answer(self, with_body):
            path = self.path.split("?")[0]
            state.requests.append((self.command, path, dict(self.headers)))
            if path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path in state.files:
                self.send_response(200)
                self.send_header("Content-Length", str(len(state.files[path])))
                self.end_headers()
                if with_body:
                    self.wfile.write(state.files[path])
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = lambda path: f"http://127.0.0.1:{server.server_address[1]}{path}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def store(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture(scope="session")
def penguins_pipeline(tmp_path_factory, penguins_spec):
    """The penguins pipeline run once through the tfjobs library (no Airflow), shared by tests."""
    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.evaluate import evaluate_model
    from tfjobs.export import ExportArgs, export_model
    from tfjobs.fetch import fetch_dataset
    from tfjobs.storage.layout import Layout
    from tfjobs.shard import shard_dataset
    from tfjobs.train import TrainArgs, train_model
    from tfjobs.validate import validate_dataset

    spec = penguins_spec
    layout = Layout(str(tmp_path_factory.mktemp("store")), spec.name, "2026-11-25", run="r1")
    run = SimpleNamespace(layout=layout, spec=spec)
    run.fetch = fetch_dataset(spec, layout.raw)
    run.validate = validate_dataset(spec, layout.raw, layout.validated)
    run.shard = shard_dataset(spec, layout.validated, layout.shards)
    run.adapt = adapt_preprocessing(spec, run.shard.manifest_uri, layout.preprocessing)
    run.train = train_model(TrainArgs(spec, run.shard.manifest_uri, run.adapt.state_uri, layout.run_dir + "/train"))
    run.evaluate = evaluate_model(
        spec, run.train.model_uri, run.train.state_uri, run.shard.manifest_uri, layout.run_dir + "/evaluate"
    )
    run.export = export_model(
        ExportArgs(spec, run.train.model_uri, run.train.state_uri, run.shard.manifest_uri,
                   run.evaluate.metrics_uri, layout.serving, 1764028800)
    )
    return run
