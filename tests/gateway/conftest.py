"""The scoring gateway as `mms gateway` runs it (a process of its own on the test database), the
API beside it (a live server, committed data), and real scoring_server processes as replicas.

Nothing creates replicas yet (the reconciler is a later slice): the tests write the
``service_replicas`` rows and the traffic generation as it will.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from app.context import ServiceContext
from app.database import session_scope
from app.deployments.states import ServiceState
from app.deployments.transitions import Transition, move
from app.orm import Account, Image, Manifest, Service, ServiceReplica
from app.orm.base import utcnow
from tests.embedded_service import free_port
from tests.live_server import Live, live_service
from tests.scoring_server.scoring_server_harness import Server, launch, stop

MAX_RESPONSE_BYTES = 1024 * 1024  # the gateway's cap on a replica's reply, in these tests

# A replica that answers with what it received: its port, how many requests run() has seen,
# the request's headers and body.
ECHO_SCRIPT = """
import json
import os

calls = 0


def init():
    pass


def run(raw_data, request_headers):
    global calls
    calls += 1
    return {"port": int(os.environ["PORT"]), "calls": calls, "headers": request_headers, "echo": json.loads(raw_data)}
"""


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen
    log: Path
    started_peak: int = 0  # peak_rss_bytes() once it answered its first request

    def peak_rss_bytes(self) -> int:
        """The most resident memory the gateway process has had (VmHWM): what a burst cost,
        even once freed."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def gateway(service_context: ServiceContext, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """`mms gateway` on a free loopback port, logging JSON lines (INFO) to a file."""
    settings = service_context.settings
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = {
        **os.environ,
        "MMS_DATABASE_URL": settings.resolved_database_url,
        "MMS_SECRET_KEY": settings.secret_key or "",
        "MMS_DATA_DIR": str(settings.data_dir),
        "MMS_AUTO_MIGRATE": "false",
        "MMS_LOG_LEVEL": "INFO",
        "MMS_LOG_FORMAT": "json",
        "MMS_GATEWAY_CACHE_SECONDS": "2",
        "MMS_GATEWAY_MAX_RESPONSE_BYTES": str(MAX_RESPONSE_BYTES),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "gateway", "--port", str(port)], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/api/v1/service/{uuid.uuid4()}/swagger.json", timeout=1).status_code == 404:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the gateway did not start in 30 s:\n{log.read_text()}"
            time.sleep(0.1)
        gateway = Gateway(url, process, log)
        gateway.started_peak = gateway.peak_rss_bytes()
        yield gateway
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Two scoring_server processes running ECHO_SCRIPT on loopback."""
    servers: list[Server] = []
    try:
        for _ in range(2):
            servers.append(launch(tmp_path_factory.mktemp("replica"), ECHO_SCRIPT))
        yield servers
    finally:
        for server in servers:
            stop(server.proc)


def address(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


@dataclass
class Deployed:
    id: str
    url: str  # the API's URL of the service
    score: str  # the gateway's scoring URL
    swagger: str
    primary: str
    secondary: str


@dataclass
class Services:
    """Services made through the API, then given replicas as the reconciler will."""

    live: Live
    gateway: Gateway
    account: str
    headers: dict[str, str]
    image_id: str | None = None

    def deploy(
        self,
        replicas: list[str],
        *,
        auth: bool = True,
        timeout_ms: int = 60000,
        ready: bool = True,
        traffic_generation: int | None = 1,
        replica_generation: int = 1,
    ) -> Deployed:
        """A service whose ``traffic_generation`` has ``replicas`` (addresses) of ``replica_generation``."""
        created = httpx.post(
            f"{self.account}/services",
            json={
                "name": f"svc-{uuid.uuid4().hex[:10]}",
                "imageId": self._image(),
                "deploymentConfig": {"authEnabled": auth, "scoringTimeoutMs": timeout_ms},
            },
            headers=self.headers,
        )
        assert created.status_code == 202, created.text
        service_id = created.json()["id"]
        with session_scope(self.live.context.session_factory) as session:
            if traffic_generation is not None:
                assert move(
                    session,
                    Transition.CONVERGE,
                    Service.id == uuid.UUID(service_id),
                    to=ServiceState.HEALTHY,
                    traffic_generation=traffic_generation,
                    replicas_ready=len(replicas) if ready else 0,
                )
            session.add_all(
                ServiceReplica(
                    service_id=uuid.UUID(service_id),
                    generation=replica_generation,
                    replica_id=f"replica-{n}",
                    address=replica,
                    ready=ready,
                )
                for n, replica in enumerate(replicas)
            )
        url = f"{self.account}/services/{service_id}"
        keys = httpx.post(f"{url}/keys", headers=self.headers)
        assert keys.status_code == 200, keys.text
        base = f"{self.gateway.url}/api/v1/service/{service_id}"
        return Deployed(
            service_id,
            url,
            f"{base}/score",
            f"{base}/swagger.json",
            keys.json()["primaryKey"],
            keys.json()["secondaryKey"],
        )

    def _image(self) -> str:
        """A Succeeded image in the account, as a worker leaves one (made once)."""
        if self.image_id is None:
            name = self.account.rsplit("/", 1)[1]
            with session_scope(self.live.context.session_factory) as session:
                account = session.scalars(
                    select(Account).where(Account.resource_group == "rg-live", Account.name == name)
                ).one()
                manifest = Manifest(
                    account_id=account.id,
                    name="m",
                    version=1,
                    driver_program="score",
                    model_type="Registered",
                    runtime_type="Python",
                    webservice_type="Realtime",
                )
                session.add(manifest)
                session.flush()
                image = Image(
                    account_id=account.id,
                    manifest_id=manifest.id,
                    name="scorer",
                    version=1,
                    image_type="Docker",
                    builder="docker",
                    state="Succeeded",
                    published_at=utcnow(),
                )
                session.add(image)
                session.flush()
                self.image_id = str(image.id)
        return self.image_id


@pytest.fixture(scope="module")
def services(service_context: ServiceContext, data_dir: Path, gateway: Gateway) -> Iterator[Services]:
    """The API (a live server with the web services preview on) and an account to deploy in."""
    with live_service(service_context, data_dir) as live:
        account = live.account()
        yield Services(live, gateway, account, live.headers)
