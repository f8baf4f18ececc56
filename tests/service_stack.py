"""The service topology of ``docker-compose.yaml``, started from processes on this machine.

PostgreSQL and Redis from Debian's packages, then Airflow's ``api-server``,
``scheduler``, ``dag-processor``, ``triggerer`` and three ``celery worker``\\ s: one for
the default queue and two for the ``gpu`` queue (concurrency 1 each, as
``docker compose up --scale airflow-worker-gpu=2`` runs them), with the
CeleryExecutor, one shared JWT secret, the FAB auth manager with an admin, an
operator (FAB's ``Op`` role) and a viewer (``Viewer``), everything on 127.0.0.1 on
free ports and every file in one temporary directory. Each Celery worker runs in a UTS namespace
of its own with its own host name, as it would in its own container, so the API
tells which worker ran a task. Until the S3 backend lands, the object store is a
local directory (all processes share this machine). Runs may fetch from the store and
from ``<root>/landing`` ([shardline] allowed_source_prefixes). Hyperparameter studies
live in a database of their own on the same PostgreSQL (``shardline_tuning``), reached
through the Airflow connection ``shardline_tuning``.

:class:`ServiceStack` starts it and stops every process it started, by process
group id, whatever happens. To look around by hand::

    .venv/bin/python tests/service_stack.py     # prints the URL and the login, Ctrl-C stops it
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from processes import free_ports, stop_process_group, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The shared datasets, read in place (tests/conftest.py's HOUSING_CSV is under it).
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
AIRFLOW = str(Path(sys.executable).parent / "airflow")
ADMIN, OPERATOR, VIEWER = "admin", "operator", "viewer"
#: Each user's FAB role, as docker-compose.yaml's README table gives them: the admin is created at init.
ROLES = {ADMIN: "Admin", OPERATOR: "Op", VIEWER: "Viewer"}
FAB_AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
DEFAULT_QUEUE = "default"
GPU_QUEUE = "gpu"
CPU_WORKER_HOST = "shardline-cpu-worker"
GPU_WORKER_HOST = "shardline-gpu-worker"
GPU_WORKER_HOSTS = (GPU_WORKER_HOST, "shardline-gpu-worker-2")
TUNING_DATABASE = "shardline_tuning"

#: Debian packages the stack (and its browser test) needs: package -> a file it installs.
DEBIAN_PACKAGES = {
    "postgresql": "/usr/lib/postgresql",
    "redis-server": "/usr/bin/redis-server",
    "chromium": "/usr/bin/chromium",
}


def ensure_debian_packages(packages: dict[str, str] = DEBIAN_PACKAGES) -> None:
    """Install the Debian packages that are missing (as root), or say which to install."""
    missing = [name for name, path in packages.items() if not Path(path).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"Install the Debian packages {' '.join(missing)} (apt-get install {' '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env,
                   capture_output=True)


def postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return versions[-1].parent


@dataclass
class ServiceStack:
    """PostgreSQL, Redis and the Airflow components, on loopback, under ``root``."""

    root: Path
    store_uri: str
    dags_folder: Path = ROOT / "dags"
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.logs = self.root / "logs"
        self.home = self.root / "airflow"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.postgres_port, self.redis_port, self.api_port, self.triggerer_log_port = free_ports(4)
        self.passwords = {user: secrets.token_urlsafe(12) for user in ROLES}
        self.password = self.passwords[ADMIN]
        self.landing = self.root / "landing"
        self.jwt_secret = secrets.token_urlsafe(32)  # one secret for every component
        self.url = f"http://127.0.0.1:{self.api_port}"
        self._postgres_dir: Path | None = None

    # -- the environment every Airflow component shares ---------------------------------------
    @property
    def env(self) -> dict[str, str]:
        database = f"airflow@127.0.0.1:{self.postgres_port}/airflow"
        return {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{database}",
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{database}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__CORE__AUTH_MANAGER": FAB_AUTH_MANAGER,
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
            "AIRFLOW__SHARDLINE__GPU_QUEUE": GPU_QUEUE,
            "AIRFLOW__SHARDLINE__STORE_URI": self.store_uri,
            # The landing folder, and the shared datasets the tests read in place (the housing CSV).
            "AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES": f"{self.landing},{SHARED_DATASETS}",
            "AIRFLOW__SHARDLINE__TUNING_CONN_ID": TUNING_DATABASE,
            f"AIRFLOW_CONN_{TUNING_DATABASE.upper()}": self.tuning_url.replace("postgresql+psycopg2", "postgresql"),
            "AIRFLOW__LOGGING__TRIGGERER_LOG_SERVER_PORT": str(self.triggerer_log_port),
            # Active at once, and no daily run of its own: the runs are the ones the tests start.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **self.extra_env,
        }

    @property
    def tuning_url(self) -> str:
        """The study database (Optuna's RDB storage), as SQLAlchemy takes it."""
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.postgres_port}/{TUNING_DATABASE}"

    # -- starting and stopping ----------------------------------------------------------------
    def start(self) -> ServiceStack:
        ensure_debian_packages()
        self._start_postgres()
        self._start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
                              "--appendonly", "no", "--dir", str(self.root)])
        wait_for(lambda: self._redis_ping(), 60, "Redis")
        migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=self.env, capture_output=True, text=True)
        (self.logs / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{migrate.stderr[-3000:]}")
        # The first admin, as docker-compose.yaml's airflow-init creates it.
        admin = subprocess.run([AIRFLOW, "users", "create", "--role", ROLES[ADMIN], "--username", ADMIN,
                                "--password", self.password, "--firstname", "Shardline", "--lastname", "Admin",
                                "--email", f"{ADMIN}@example.com"], env=self.env, capture_output=True, text=True)
        (self.logs / "users-create.log").write_text(admin.stdout + admin.stderr)
        if admin.returncode != 0:
            raise RuntimeError(f"airflow users create failed:\n{admin.stderr[-3000:]}")
        self._start("api-server", [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
                                   "--workers", "1"])
        self._start("scheduler", [AIRFLOW, "scheduler"])
        self._start("dag-processor", [AIRFLOW, "dag-processor"])
        self._start("triggerer", [AIRFLOW, "triggerer"])
        self._start_worker("cpu-worker", CPU_WORKER_HOST, DEFAULT_QUEUE, concurrency=2)
        self._start_worker("gpu-worker", GPU_WORKER_HOSTS[0], GPU_QUEUE, concurrency=1)
        self._start_worker("gpu-worker-2", GPU_WORKER_HOSTS[1], GPU_QUEUE, concurrency=1)
        wait_for(self._healthy, 300, f"the api-server at {self.url} to report every component healthy (logs in "
                 f"{self.logs})", interval_s=2)
        for name in ("cpu-worker", "gpu-worker", "gpu-worker-2"):
            wait_for(lambda name=name: "ready." in self.log(name), 180, f"the Celery {name} (log {self.logs})", 2)
        self._add_users()
        return self

    def _add_users(self) -> None:
        """The operator and the viewer, added by the admin as a person would (FAB's users API, as the UI does)."""
        with self.api() as admin:
            for user, role in ROLES.items():
                if user == ADMIN:
                    continue
                response = admin.post(f"{self.url}/auth/fab/v1/users", json={
                    "username": user, "password": self.passwords[user], "email": f"{user}@example.com",
                    "first_name": user.title(), "last_name": "Shardline", "roles": [{"name": role}]})
                if response.status_code != 200:
                    raise RuntimeError(f"Could not add the user {user}: HTTP {response.status_code} {response.text}")

    def stop(self) -> None:
        """Stop every process this stack started, newest first, each by its process group id."""
        for name, process in reversed(list(self.processes.items())):
            stop_process_group(process, signal.SIGINT if name == "postgres" else signal.SIGTERM, grace_s=20)
        if self._postgres_dir:
            shutil.rmtree(self._postgres_dir, ignore_errors=True)

    def __enter__(self) -> ServiceStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, name: str, command: list[str], **popen) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=popen.pop("env", self.env), cwd=popen.pop("cwd", ROOT),
                                   start_new_session=True, **popen)
        log.close()
        self.processes[name] = process
        return process

    def _start_worker(self, name: str, host: str, queue: str, concurrency: int) -> None:
        """A Celery worker with a host name of its own (a UTS namespace), like a container's."""
        worker = [AIRFLOW, "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
                  "--celery-hostname", f"{name}@{host}", "--skip-serve-logs", "--without-mingle",
                  "--without-gossip"]
        # Root may unshare the UTS namespace; anyone else needs a user namespace around it.
        unshare = ["unshare", "--uts"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--uts"]
        self._start(name, [*unshare, "sh", "-c", f'hostname {host} && exec "$@"', "sh", *worker])

    def _start_postgres(self) -> None:
        """PostgreSQL refuses to run as root: as root, it runs as the ``postgres`` user."""
        bin_dir = postgres_bin()
        as_postgres = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
        self._postgres_dir = Path(tempfile.mkdtemp(prefix="shardline-postgres-"))
        if as_postgres:
            shutil.chown(self._postgres_dir, "postgres", "postgres")
        data = self._postgres_dir / "data"
        subprocess.run([bin_dir / "initdb", "-D", data, "-U", "airflow", "-A", "trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, cwd=self._postgres_dir, **as_postgres)
        self._start("postgres", [bin_dir / "postgres", "-D", data, "-h", "127.0.0.1", "-p", str(self.postgres_port),
                                 "-k", self._postgres_dir, "-c", "max_connections=300", "-c", "fsync=off",
                                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                    cwd=self._postgres_dir, **as_postgres)
        wait_for(self._create_database, 60, "PostgreSQL")

    def _create_database(self) -> bool:
        import psycopg2

        try:
            connection = psycopg2.connect(host="127.0.0.1", port=self.postgres_port, user="airflow", dbname="postgres")
        except psycopg2.OperationalError:
            return False
        connection.autocommit = True
        with contextlib.closing(connection), connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE airflow")
            cursor.execute(f"CREATE DATABASE {TUNING_DATABASE}")
        return True

    def _redis_ping(self) -> bool:
        import redis

        with contextlib.suppress(redis.exceptions.ConnectionError):
            return redis.Redis(host="127.0.0.1", port=self.redis_port).ping()
        return False

    def _healthy(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{self.log(name)[-3000:]}")
        try:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all(health.get(part, {}).get("status") == "healthy"
                   for part in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    # -- the REST API ------------------------------------------------------------------------
    def api(self, user: str = ADMIN) -> httpx.Client:
        """A client for ``/api/v2`` as ``user``, with a JWT from ``POST /auth/token`` (the FAB auth manager's login)."""
        response = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": self.passwords[user]},
                              timeout=30)
        response.raise_for_status()
        token = response.json()["access_token"]
        return httpx.Client(base_url=f"{self.url}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=60)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop everything on SIGTERM too
    root = Path(tempfile.mkdtemp(prefix="shardline-service-"))
    with ServiceStack(root, store_uri=str(root / "store")) as stack:
        for user, role in ROLES.items():
            print(f"Airflow UI and API: {stack.url}  (user {user}, role {role}, password {stack.passwords[user]})")
        print(f"Logs: {stack.logs}; store: {stack.store_uri}. Ctrl-C stops every process.")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
