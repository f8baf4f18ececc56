"""docker-compose.yaml, checked by a real Compose parser (Debian's docker-compose; no Docker engine needed).

``docker-compose config`` validates the file against the Compose schema, resolves
anchors and ``.env`` interpolation, and prints the result, which the tests read.
The stack itself is not started here: these machines have no Docker engine.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess

import pytest
import yaml

from conftest import ROOT
from service_stack import ensure_debian_packages

COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "include" / "docker" / "Dockerfile"
AIRFLOW_SERVICES = {
    "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-init",
    "airflow-worker", "airflow-worker-gpu",
}
SECRETS = ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
           "AIRFLOW_ADMIN_PASSWORD", "MINIO_ROOT_PASSWORD", "SHARDLINE_S3_SECRET_KEY"]


def example_env() -> dict[str, str]:
    """.env.example with every empty value filled, as a user does."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip() or secrets.token_urlsafe(16)
    return env


def compose_config(env: dict[str, str], tmp_path, compose_file=COMPOSE_FILE) -> subprocess.CompletedProcess:
    """``docker-compose config`` on ``compose_file`` with ``env`` as its .env, and nothing else from here."""
    ensure_debian_packages({"docker-compose": "/usr/bin/docker-compose"})
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    return subprocess.run(
        ["docker-compose", "--project-directory", str(ROOT), "-f", str(compose_file), "--env-file", str(env_file),
         "config"],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    env = example_env()
    completed = compose_config(env, tmp_path_factory.mktemp("compose"))
    assert completed.returncode == 0, completed.stderr
    return yaml.safe_load(completed.stdout), env


def command(service: dict) -> list[str]:
    value = service.get("command", [])
    return shlex.split(value) if isinstance(value, str) else list(value)


def test_services_of_the_topology(compose):
    config, _ = compose
    assert set(config["services"]) == AIRFLOW_SERVICES | {"postgres", "redis", "minio", "minio-create-bucket"}
    for name in AIRFLOW_SERVICES:
        service = config["services"][name]
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert service["build"]["dockerfile"] == "include/docker/Dockerfile", name
    assert DOCKERFILE.read_text().count("FROM apache/airflow:") == 1


def test_one_jwt_secret_for_every_airflow_component(compose):
    config, env = compose
    secrets_seen = {config["services"][name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for name in AIRFLOW_SERVICES}
    assert secrets_seen == {env["AIRFLOW_JWT_SECRET"]}


def test_cpu_worker_serves_the_default_queue_and_gpu_worker_the_gpu_queue(compose):
    from operators.train import gpu_queue

    config, _ = compose
    cpu, gpu = config["services"]["airflow-worker"], config["services"]["airflow-worker-gpu"]
    assert command(cpu)[:4] == ["celery", "worker", "--queues", "default"]
    assert cpu["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"
    assert command(gpu) == ["celery", "worker", "--queues", "gpu", "--concurrency", "1"]
    # The training operator's default queue is the one the GPU worker serves.
    assert gpu["environment"]["AIRFLOW__SHARDLINE__GPU_QUEUE"] == gpu_queue() == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]
    assert gpu["build"]["args"] == {"TENSORFLOW_EXTRA": "and-cuda"} and "args" not in cpu["build"]
    assert gpu["image"] != cpu["image"]
    assert "TENSORFLOW_EXTRA" in DOCKERFILE.read_text()


def test_store_is_minio_with_its_bucket_and_a_connection_from_the_environment(compose):
    config, env = compose
    services = config["services"]
    bucket = env["MINIO_BUCKET"]
    airflow_env = services["airflow-worker-gpu"]["environment"]
    assert airflow_env["AIRFLOW__SHARDLINE__STORE_URI"] == f"s3://{bucket}"
    assert airflow_env["AIRFLOW__SHARDLINE__STORE_CONN_ID"] == "shardline_store"
    connection = json.loads(airflow_env["AIRFLOW_CONN_SHARDLINE_STORE"])
    assert connection["conn_type"] == "aws" and connection["extra"]["endpoint_url"] == "http://minio:9000"
    assert (connection["login"], connection["password"]) == (env["SHARDLINE_S3_ACCESS_KEY"],
                                                             env["SHARDLINE_S3_SECRET_KEY"])
    create = services["minio-create-bucket"]
    script = "\n".join(command(create)).replace("$$", "$")  # config prints $ escaped, as in the file
    assert 'mc mb --ignore-existing "store/$MINIO_BUCKET"' in script
    assert create["environment"]["MINIO_BUCKET"] == bucket
    for name in AIRFLOW_SERVICES:
        assert services[name]["depends_on"]["minio-create-bucket"]["condition"] == "service_completed_successfully"
    assert services["airflow-apiserver"]["ports"][0]["target"] == 8080


def test_no_secret_is_committed(compose, tmp_path):
    config, env = compose
    committed = "\n".join(p.read_text() for p in (COMPOSE_FILE, ENV_EXAMPLE, DOCKERFILE))
    rendered = yaml.safe_dump(config)
    for name in SECRETS:
        assert env[name] in rendered, name  # used ...
        assert env[name] not in committed, name  # ... and only ever from the environment
        assert re.search(rf"^{name}=$", ENV_EXAMPLE.read_text(), re.M), f"{name} must be empty in .env.example"


@pytest.mark.parametrize("missing", SECRETS)
def test_a_missing_secret_stops_compose_naming_it(missing, tmp_path):
    env = {name: value for name, value in example_env().items() if name != missing}
    completed = compose_config(env, tmp_path)
    assert completed.returncode != 0
    assert f"set {missing} in .env" in completed.stderr


def test_env_example_documents_every_variable_the_file_uses():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))  # $${X}: the container's
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert used <= documented, sorted(used - documented)


def test_compose_parser_rejects_an_unknown_option(tmp_path):
    broken = COMPOSE_FILE.read_text().replace("    command: api-server\n", "    command: api-server\n    comand: x\n")
    (tmp_path / "docker-compose.yaml").write_text(broken)
    completed = compose_config(example_env(), tmp_path, tmp_path / "docker-compose.yaml")
    assert completed.returncode != 0 and "comand" in completed.stderr


def test_users_log_in_through_the_fab_auth_manager_with_the_admin_from_env(compose):
    import importlib

    from airflow.api_fastapi.auth.managers.base_auth_manager import BaseAuthManager

    from service_stack import FAB_AUTH_MANAGER

    config, env = compose
    for name in AIRFLOW_SERVICES:
        environment = config["services"][name]["environment"]
        assert environment["AIRFLOW__CORE__AUTH_MANAGER"] == FAB_AUTH_MANAGER, name
        assert not [key for key in environment if "SIMPLE_AUTH_MANAGER" in key], name
    module, _, name = FAB_AUTH_MANAGER.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), BaseAuthManager)
    assert re.search(r"^apache-airflow-providers-fab==\S+$", (ROOT / "requirements.txt").read_text(), re.M)
    init = config["services"]["airflow-init"]
    script = " ".join(command(init)).replace("$$", "$").replace("\\\n", " ")
    assert re.search(r'airflow users create --role Admin --username "\$\{_AIRFLOW_ADMIN_USER\}"\s+'
                     r'--password "\$\{_AIRFLOW_ADMIN_PASSWORD\}"', script), script
    assert (init["environment"]["_AIRFLOW_ADMIN_USER"], init["environment"]["_AIRFLOW_ADMIN_PASSWORD"]) == (
        env["AIRFLOW_ADMIN_USER"], env["AIRFLOW_ADMIN_PASSWORD"])
    # The embedded Airflow of `make airflow` stays on the simple auth manager, for one person on a laptop.
    made = subprocess.run(["make", "-n", "airflow"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "AIRFLOW__CORE__AUTH_MANAGER=airflow.api_fastapi.auth.managers.simple.simple_auth_manager." in made


def test_the_allowed_source_prefixes_come_from_env(compose, tmp_path):
    config, _ = compose
    assert config["services"]["airflow-worker"]["environment"]["AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES"]
    env = {**example_env(), "SHARDLINE_ALLOWED_SOURCE_PREFIXES": ""}
    completed = compose_config(env, tmp_path)
    assert completed.returncode == 0, completed.stderr
    workers = yaml.safe_load(completed.stdout)["services"]
    assert workers["airflow-worker"]["environment"]["AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES"] in ("", None)


def test_studies_of_the_trial_runners_live_in_their_own_postgres_database(compose):
    config, env = compose
    services = config["services"]
    for name in ("airflow-worker-gpu", "airflow-worker"):
        airflow_env = services[name]["environment"]
        assert airflow_env["AIRFLOW__SHARDLINE__TUNING_CONN_ID"] == "shardline_tuning"
        assert airflow_env["AIRFLOW_CONN_SHARDLINE_TUNING"] == (
            f"postgresql://airflow:{env['POSTGRES_PASSWORD']}@postgres:5432/shardline_tuning")
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}{':ro' if v.get('read_only') else ''}"
               for v in services["postgres"]["volumes"]]
    assert f"{ROOT / 'include' / 'docker' / 'postgres-init'}:/docker-entrypoint-initdb.d:ro" in volumes
    assert "CREATE DATABASE shardline_tuning;" in (ROOT / "include" / "docker" / "postgres-init" /
                                                   "10-shardline-tuning.sql").read_text()
