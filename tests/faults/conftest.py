"""Fixtures for the fault-injection tests: a PostgreSQL cluster, a Redis server and an OCI
registry (CNCF Distribution) of their own.

The machine's shared PostgreSQL (5432), Redis (6379) and registries serve other tests and CI,
so they are never restarted here: each fault test restarts only these, which it started itself
on free loopback ports and stops at teardown within bounded timeouts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.embedded_service import HOST_CA_BUNDLE, free_port, wait_for
from tests.faults.build_service import Gate, ModelFiles, Service
from tests.registry_proxy import CountingProxy

PG_ROOT = Path("/usr/lib/postgresql")
BASE_ROOTFS = Path(__file__).resolve().parents[2] / "scripts" / "infra" / "base-rootfs.sh"


def _pg_bin() -> Path | None:
    versions = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "pg_ctl").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


@dataclass
class PostgresCluster:
    """A throw-away cluster run as the ``postgres`` OS user (PostgreSQL refuses root)."""

    bin: Path
    data: Path
    port: int
    as_user: list[str]

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"pg_ctl {args[0]}: {done.stdout[-1000:]} {done.stderr[-1000:]}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.data} "
            "-c fsync=off -c max_connections=100"
        )
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.data / "server.log"), "-o", options)

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every session is cut, then the server comes back."""
        self.pg_ctl("restart", "-m", "fast", "-w", "-t", "60", "-l", str(self.data / "server.log"))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh database's SQLAlchemy URL."""
        name = f"faults_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True, connect_timeout=10
        ) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """Its own PostgreSQL on a free loopback port, stopped (immediately) and removed at teardown."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip(f"needs PostgreSQL's server binaries under {PG_ROOT}/<version>/bin (apt-get install postgresql)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="mms-faults-pg-"))
    data = root / "data"
    if as_user:
        shutil.chown(root, "postgres")
    made = subprocess.run(
        [
            *as_user,
            str(pg_bin / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    cluster = PostgresCluster(bin=pg_bin, data=data, port=free_port(), as_user=as_user)
    cluster.start()
    try:
        yield cluster
    finally:
        subprocess.run(
            [*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "stop", "-m", "immediate", "-w", "-t", "30"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class RedisServer:
    """A redis-server that keeps nothing on disk: a restart loses every queued message."""

    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.log.parent),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()[-2000:]
            try:
                with redis.Redis(port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server did not answer in 30 s"
            time.sleep(0.1)

    def queue_length(self, name: str) -> int:
        with redis.Redis(port=self.port, socket_timeout=1) as client:
            return client.llen(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # as a crash: nothing is saved (and --save '' anyway)
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Its own redis-server on a free loopback port, killed at teardown."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    server = RedisServer(port=free_port(), log=tmp_path_factory.mktemp("redis") / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: fault-tests-registry-secret
"""


@dataclass
class Registry:
    """A CNCF Distribution registry (Debian's docker-registry), its blobs in a folder of its own."""

    port: int
    root: Path
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.root / "config.yml"
        config.write_text(REGISTRY_CONFIG.format(storage=self.root / "storage", port=self.port))
        with open(self.root / "registry.log", "ab") as log:
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, (self.root / "registry.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://{self.address}/v2/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the registry did not answer in 30 s"
            time.sleep(0.1)

    def stop(self) -> None:
        """As a crash: killed, what it had not finished is lost; what it stored stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def upload_sessions(self) -> list[Path]:
        """Blob uploads begun and never finished (a client that died, or the registry)."""
        return sorted(self.root.glob("storage/docker/registry/v2/repositories/**/_uploads/*/data"))


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Its own registry on a free loopback port, killed at teardown."""
    if shutil.which("docker-registry") is None:
        pytest.skip("needs the CNCF Distribution registry (apt-get install docker-registry)")
    server = Registry(port=free_port(), root=tmp_path_factory.mktemp("registry"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rootfs_tar() -> Path:
    """The Debian root file system the service publishes as its base image (built once, cached)."""
    if os.geteuid() != 0:
        pytest.skip("the base root file system needs root (debootstrap)")
    made = subprocess.run([str(BASE_ROOTFS)], capture_output=True, text=True, timeout=900, check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    return Path(made.stdout.strip().splitlines()[-1])


def service_env(data_dir: Path, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of an `mms` process of a fault test: its own data folder and database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    env.update(
        {
            "MMS_DATA_DIR": str(data_dir),
            "MMS_DATABASE_URL": database_url,
            "MMS_LOG_FORMAT": "text",
            "MMS_SECRET_KEY": "fault-tests-secret-key-0123456789abcdef",
            "MMS_PORT": str(free_port()),
            # The faults are the database's and the broker's: no image is started by an engine.
            "MMS_SMOKE_TEST": "off",
            **settings,
        }
    )
    return env


def mms(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "workers", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"mms {' '.join(args)}: {done.stderr[-3000:]}"
    return done


BUILD_QUEUE = "mms-fault-builds"


@pytest.fixture(scope="session")
def service(
    postgres_cluster: PostgresCluster,
    redis_server: RedisServer,
    registry: Registry,
    rootfs_tar: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    """`mms serve` (no worker of its own) on the suite's PostgreSQL, Redis and registry, the
    registry reached through a proxy with a gate; tests start and kill the workers.

    The reaper runs every 5 s: it re-sends a build still NotStarted after
    MMS_BUILD_REPUBLISH_SECONDS (5 here) and re-queues one whose lease (6 s) lapsed; a build
    takes seconds once the first has cached its Python dependencies.
    """
    files = ModelFiles()
    threading.Thread(target=files.serve_forever, args=(0.05,), daemon=True).start()
    gate = Gate()
    proxy = CountingProxy(registry.address, upstream_timeout=60, before=gate.before, after=gate.after).start()
    root = tmp_path_factory.mktemp("fault-builds")
    worker_tmp = root / "tmp"
    worker_tmp.mkdir()
    env = service_env(
        root / "data",
        postgres_cluster.create_database(),
        MMS_BROKER_URL=redis_server.url,
        MMS_BUILD_QUEUE=BUILD_QUEUE,
        MMS_REGISTRY=proxy.address,
        MMS_BUILD_LEASE_SECONDS="6",
        MMS_BUILD_REPUBLISH_SECONDS="5",
        MMS_FETCH_ALLOW_HOSTS=json.dumps([files.address]),
        TMPDIR=str(worker_tmp),
    )
    if HOST_CA_BUNDLE.is_file():  # this machine reaches PyPI through a TLS-inspecting proxy
        env["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    mms(env, "db", "upgrade")
    mms(env, "base-image", "publish", "--rootfs-tar", str(rootfs_tar))
    owner = json.loads(mms(env, "admin", "bootstrap", "-o", "json").stdout)
    service = Service(
        api=f"http://127.0.0.1:{env['MMS_PORT']}",
        headers={},
        env=env,
        log_dir=root / "logs",
        files=files,
        proxy=proxy,
        gate=gate,
        worker_tmp=worker_tmp,
    )
    service.log_dir.mkdir()
    try:
        wait_for(f"{service.api}/health", service.start("serve", "--no-build-worker"))
        token = httpx.post(
            f"{service.api}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": owner["clientId"],
                "client_secret": owner["clientSecret"],
            },
        ).json()["access_token"]
        service.headers = {"Authorization": f"Bearer {token}"}
        yield service
    finally:
        gate.release()
        for process in service.processes:
            if process.poll() is None:
                process.terminate()
        for process in service.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        files.held.set()
        files.shutdown()
        files.server_close()
        proxy.stop()
