"""The embedded default, as the README runs it: `mms serve` with no Redis, no registry, no engine.

SQLite, local assets, the embedded broker, a build worker started by `mms serve` itself, and
images in the service's own store, pulled back by the Docker engine (a real client) with a
service principal's id and secret. Restarting the service loses no queued build.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest

from tests.workers.conftest import HOST_CA_BUNDLE, TEST_LABEL, Infra
from tests.workers.test_image_builds import (
    ECHO_SCORE,
    SCORE_PY,
    Account,
    Stack,
    _free_port,
    _register,
    _requirements,
    _wait_for,
)


@dataclass
class Embedded:
    env: dict[str, str]
    port: int
    data_dir: Path
    log_dir: Path
    client_id: str
    client_secret: str

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mms(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def serve(self, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"serve-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", *args], env=self.env,
                                  stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait_for(f"{self.api}/health", server)
        return server

    def stack(self) -> Stack:
        token = httpx.post(f"{self.api}/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": self.client_id,
            "client_secret": self.client_secret}).json()["access_token"]
        return Stack(api=self.api, headers={"Authorization": f"Bearer {token}"}, env=self.env,
                     workers=[], log_dir=self.log_dir)


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its parent.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


@pytest.fixture(scope="module")
def embedded(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """A data folder with the base image published into the service's own store."""
    data_dir = tmp_path_factory.mktemp("embedded-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    port = _free_port()
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text",
                "MMS_BUILD_LEASE_SECONDS": "6"})
    if HOST_CA_BUNDLE.is_file():  # this machine reaches PyPI through a TLS-inspecting proxy
        env["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    setup = Embedded(env, port, data_dir, tmp_path_factory.mktemp("embedded-logs"), "", "")
    published = setup.mms("base-image", "publish", "--rootfs-tar", str(infra.rootfs_tar))
    assert published.returncode == 0, published.stderr[-3000:]
    assert f"127.0.0.1:{port}/mms/inference-base:py3.11-" in published.stderr
    again = setup.mms("base-image", "publish", "--if-missing")
    assert again.returncode == 0 and "already published" in again.stderr
    owner = setup.mms("admin", "bootstrap", "-o", "json")
    assert owner.returncode == 0, owner.stderr
    credentials = json.loads(owner.stdout)
    setup.client_id, setup.client_secret = credentials["clientId"], credentials["clientSecret"]
    yield setup


def test_the_run_command_alone_builds_serves_images_and_resumes_queued_builds(
    embedded: Embedded, infra: Infra, model
) -> None:
    trained, rows, archive = model
    # Queued while no worker runs, then the service stops: the build must survive.
    server = embedded.serve("--no-build-worker")
    try:
        account = Account(embedded.stack())
        manifest_id = account.manifest(_register(account, archive), SCORE_PY, _requirements())
        created = account.build(manifest_id, "housing-image")
        time.sleep(2)
        assert account.call("GET", f"{account.url}/images/{created['Id']}").json()["CreationState"] == "NotStarted"
    finally:
        _stop(server)

    server = embedded.serve()  # the README's run command: starts its own build worker
    try:
        [worker_pid] = _children(server.pid)
        account.stack = embedded.stack()
        image = account.wait(created["Id"])
        log = account.log(image)
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "with the oci builder" in log and "smoke test skipped" in log
        account_id = account.call("GET", account.url).json()["properties"]["accountId"]
        repository = f"127.0.0.1:{embedded.port}/{account_id}/housing-image"
        assert image["ImageLocation"] == f"{repository}:1"
        assert (embedded.data_dir / "images" / "index.json").is_file()

        # The Docker engine pulls it from the service with a service principal's login.
        login = {"username": embedded.client_id, "password": embedded.client_secret}
        with infra.api() as api:
            try:  # the engine refuses at once, or streams the refusal
                refusal = " ".join(str(c.get("error", "")) for c in
                                   api.pull(repository, tag="1", stream=True, decode=True))
            except docker.errors.APIError as exc:
                refusal = str(exc)
            assert re.search("(?i)unauthorized|denied|authentication required", refusal), refusal
            chunks = list(api.pull(repository, tag="1", stream=True, decode=True, auth_config=login))
            assert not [c for c in chunks if "error" in c], chunks[-3:]
            infra.local_images.append(image["ImageLocation"])
            port = _free_port()
            container = api.create_container(
                image["ImageLocation"], environment={"PORT": str(port)}, labels={TEST_LABEL: "1"},
                host_config=api.create_host_config(network_mode="host"))
            api.start(container)
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        scored = httpx.post(f"http://127.0.0.1:{port}/score", json={"data": rows}, timeout=5)
                        break
                    except httpx.TransportError:
                        assert time.monotonic() < deadline, api.logs(container).decode()[-2000:]
                        time.sleep(0.5)
            finally:
                api.remove_container(container, force=True)
        assert scored.status_code == 200, scored.text
        assert scored.json() == trained.predict(rows).tolist()

        # An image of the service's own store as a base, read back through its /v2/ with the
        # Bearer token flow, by the builder's registry client.
        body = {"name": "on-own-image", "modelIds": [],
                "assets": [{"id": "score.py", "url": account.upload("score.py", ECHO_SCORE.encode())}],
                "entryScript": "score.py", "runtime": "python", "baseImage": image["ImageLocation"],
                "baseImageRegistry": {"address": f"127.0.0.1:{embedded.port}", **login}}
        derived_manifest = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
        derived = account.wait(account.build(derived_manifest, "derived")["Id"])
        derived_log = account.log(derived)
        assert derived["CreationState"] == "Succeeded", derived_log[-3000:]
        assert f"reading base image {repository}:1" in derived_log
        assert embedded.client_secret not in derived_log
    finally:
        _stop(server)
    assert not _alive(worker_pid), "the build worker outlived `mms serve`"
