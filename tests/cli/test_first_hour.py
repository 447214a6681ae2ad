"""A user's first hour with a fresh `mms serve` on a port of its own (no base image published
yet), driven through the real `mms` commands: signing in, what a failed command leaves behind,
a build worker run apart from the service, and what a build says when no base image exists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from tests.embedded_service import EmbeddedService, free_port, stop
from tests.mms_client.test_client import Client

SCORE_PY = "def init():\n    pass\n\ndef run(raw_data):\n    return raw_data\n"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """`mms serve` on the embedded default, without its build worker (tests start their own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    port = free_port()
    data_dir = tmp_path_factory.mktemp("first-hour-data")
    env.update(
        {"MMS_DATA_DIR": str(data_dir), "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text", "MMS_BUILD_LEASE_SECONDS": "6"}
    )
    embedded = EmbeddedService(env, port, data_dir, tmp_path_factory.mktemp("first-hour-logs"))
    server = embedded.serve("--no-build-worker")
    try:
        yield embedded
    finally:
        stop(server)


def beside(service: EmbeddedService, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A server-side `mms` command run beside the service: its data folder, not its port."""
    environment = {k: v for k, v in service.env.items() if k != "MMS_PORT"}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def owner(service: EmbeddedService) -> dict[str, str]:
    done = beside(service, "admin", "bootstrap", "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture()
def client(service: EmbeddedService, owner: dict[str, str], tmp_path: Path) -> Client:
    """A signed-in client with an account of its own."""
    client = Client(tmp_path / "config", service.url)
    done = client.run(
        "login", "--service-principal", "-u", owner["clientId"], "-p", owner["clientSecret"], "--server", service.url
    )
    assert done.returncode == 0, done.stderr
    created = client.run(
        "account", "modelmanagement", "create", "-l", "eastus2", "-g", "rg1", "-n", f"acct-{uuid.uuid4().hex[:6]}"
    )
    assert created.returncode == 0, created.stderr
    return client


def test_bootstrap_prints_the_token_url_the_service_serves(service: EmbeddedService, owner: dict[str, str]) -> None:
    # Run without MMS_PORT: the port is the one `mms serve` recorded, not 8000.
    assert owner["tokenUrl"] == f"{service.url}/oauth2/token"


def test_login_reads_mms_server_and_takes_a_bare_host_and_port(
    service: EmbeddedService, owner: dict[str, str], tmp_path: Path
) -> None:
    from_env = Client(tmp_path / "env", service.url)
    done = from_env.run(
        "login",
        "--service-principal",
        "-u",
        owner["clientId"],
        "-p",
        owner["clientSecret"],
        env={"MMS_SERVER": f"127.0.0.1:{service.port}"},
    )
    assert done.returncode == 0, done.stderr
    assert from_env.json("env", "show")["server"] == service.url

    bare = Client(tmp_path / "bare", service.url)
    done = bare.run(
        "login",
        "--service-principal",
        "-u",
        owner["clientId"],
        "-p",
        owner["clientSecret"],
        "--server",
        f"localhost:{service.port}",
    )
    assert done.returncode == 0, done.stderr
    assert bare.json("env", "show")["server"] == f"http://localhost:{service.port}"

    nowhere = Client(tmp_path / "nowhere", service.url)
    done = nowhere.run("login", "--service-principal", "-u", owner["clientId"], "-p", owner["clientSecret"])
    assert done.returncode == 1 and "MMS_SERVER" in done.stderr and "--server" in done.stderr
    done = nowhere.run("login", "--service-principal", "-u", owner["clientId"], "-p", "x", "--server", "ftp://x")
    assert done.returncode == 1 and "host:port" in done.stderr


def _stored_files(service: EmbeddedService) -> list[Path]:
    return sorted(p for p in (service.data_dir / "assets").rglob("*") if p.is_file())


def test_a_failed_manifest_create_uploads_nothing_and_leaves_nothing(
    service: EmbeddedService, client: Client, tmp_path: Path
) -> None:
    score = tmp_path / "score.py"
    score.write_text(SCORE_PY)
    before = _stored_files(service)

    missing = str(uuid.uuid4())
    done = client.run("manifest", "create", "-n", "m1", "-f", str(score), "-i", missing)
    assert done.returncode == 1
    assert missing in done.stderr and "nothing was uploaded" in done.stderr
    assert _stored_files(service) == before

    # A failure after the uploads (a name the service refuses): the model this command
    # registered and every file it uploaded are deleted again.
    model = tmp_path / "model.pkl"
    model.write_bytes(b"model bytes")
    done = client.run("manifest", "create", "-n", "bad name", "-f", str(score), "-m", str(model))
    assert done.returncode == 1 and "name" in done.stderr
    assert "Deleted the 2 upload(s) and 1 model(s)" in done.stderr
    assert client.json("model", "list") == []
    assert _stored_files(service) == before

    done = client.run("model", "register", "-m", str(model), "-n", "bad name")
    assert done.returncode == 1
    assert _stored_files(service) == before


def _worker(service: EmbeddedService, **env: str) -> subprocess.Popen:
    environment = {k: v for k, v in service.env.items() if k != "MMS_PORT"}
    log = open(service.log_dir / f"worker-{uuid.uuid4().hex[:6]}.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers", "worker"], env={**environment, **env}, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return worker


def _stop(worker: subprocess.Popen) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _build(client: Client, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    score = tmp_path / "score.py"
    score.write_text(SCORE_PY)
    manifest = client.json("manifest", "create", "-n", f"m-{uuid.uuid4().hex[:6]}", "-f", str(score))
    return client.run(
        "image", "create", "-n", "img", "--manifest-id", manifest["id"], "--wait", "--timeout", "180", timeout=240
    )


def test_a_separate_worker_finds_the_service_and_says_what_to_publish(
    service: EmbeddedService, client: Client, tmp_path: Path
) -> None:
    # A worker run apart, told a wrong address: the failure names the setting that fixes it.
    worker = _worker(service, MMS_PUBLIC_URL=f"http://127.0.0.1:{free_port()}")
    try:
        done = _build(client, tmp_path)
    finally:
        _stop(worker)
    assert done.returncode == 2, done.stderr
    assert f"refusing {service.url}/blobs/" in done.stderr
    assert f"set MMS_PUBLIC_URL={service.url}" in done.stderr

    # Without MMS_PUBLIC_URL or MMS_PORT it reads where `mms serve` serves from the data
    # folder: the fetch works, and the missing base image comes with the command to publish one.
    worker = _worker(service)
    try:
        done = _build(client, tmp_path)
    finally:
        _stop(worker)
    assert done.returncode == 2, done.stderr
    assert "refusing" not in done.stderr
    assert "pull-base:" in done.stderr and "not found" in done.stderr
    assert "publish one with `mms base-image publish`" in done.stderr


def test_the_served_url_goes_with_the_server(tmp_path: Path) -> None:
    # A stale record would make a later worker take whatever listens at that address next
    # for the service's own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    port, data_dir = free_port(), tmp_path / "data"
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text"})
    embedded = EmbeddedService(env, port, data_dir, tmp_path)
    server = embedded.serve("--no-build-worker")
    settings = Settings(data_dir=data_dir)
    try:
        assert settings.recorded_served_url() == embedded.url
    finally:
        stop(server)
    assert settings.recorded_served_url() is None


def test_account_list_without_a_resource_group_shows_every_account_the_caller_may_use(client: Client) -> None:
    current = client.json("account", "modelmanagement", "show")
    other = client.json("account", "modelmanagement", "create", "-l", "eastus2", "-g", "rg2", "-n", "acct-other")
    everywhere = {a["id"] for a in client.json("account", "modelmanagement", "list")}
    assert {current["id"], other["id"]} <= everywhere
    in_rg2 = {a["id"] for a in client.json("account", "modelmanagement", "list", "-g", "rg2")}
    assert other["id"] in in_rg2 and current["id"] not in in_rg2
