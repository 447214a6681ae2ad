"""The service as the README runs it, in a process of its own: `mms serve` on the embedded
default (SQLite, local files, its own build worker and image store), with a data folder that
has the base image published and a first Owner. Used by the end-to-end tests of the service
and of the command-line client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {seconds} s")


@dataclass
class EmbeddedService:
    env: dict[str, str]
    port: int
    data_dir: Path
    log_dir: Path
    client_id: str = ""
    client_secret: str = ""

    @classmethod
    def prepare(cls, data_dir: Path, log_dir: Path, rootfs_tar: Path, **settings: str) -> EmbeddedService:
        """A data folder with the base image published into the service's store and an Owner;
        ``settings`` are more MMS_ variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
        port = free_port()
        env.update(
            {
                "MMS_DATA_DIR": str(data_dir),
                "MMS_PORT": str(port),
                "MMS_LOG_FORMAT": "text",
                "MMS_BUILD_LEASE_SECONDS": "6",
                **settings,
            }
        )
        if HOST_CA_BUNDLE.is_file():  # this machine reaches PyPI through a TLS-inspecting proxy
            env["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
        service = cls(env, port, data_dir, log_dir)
        published = service.mms("base-image", "publish", "--rootfs-tar", str(rootfs_tar))
        assert published.returncode == 0, published.stderr[-3000:]
        assert f"127.0.0.1:{port}/mms/inference-base:py3.11-" in published.stderr
        again = service.mms("base-image", "publish", "--if-missing")
        assert again.returncode == 0 and "already published" in again.stderr
        owner = service.mms("admin", "bootstrap", "-o", "json")
        assert owner.returncode == 0, owner.stderr
        credentials = json.loads(owner.stdout)
        service.client_id, service.client_secret = credentials["clientId"], credentials["clientSecret"]
        return service

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def mms(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def serve(self, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"serve-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for(f"{self.url}/health", server)
        return server

    def token(self) -> str:
        return httpx.post(
            f"{self.url}/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self.client_secret},
        ).json()["access_token"]


def stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


def wait_for_children(pid: int, count: int, timeout: float = 30.0) -> list[int]:
    """The ``count`` children of ``pid``, once it has that many (within ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while len(found := children(pid)) < count:
        assert time.monotonic() < deadline, f"{pid} has {len(found)} children, not {count}"
        time.sleep(0.1)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but not yet reaped by its parent.
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
