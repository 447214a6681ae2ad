"""The end-to-end stack the image-build tests share: `mms serve` and a `mms worker` on the test
database, Redis, the engine and the registry, and an account driven through the HTTP API.

The `stack` fixture (tests/workers/conftest.py) runs ``running_stack``; tests import the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from app.context import ServiceContext
from app.database import session_scope
from app.services.principals import create_service_principal
from tests.embedded_service import HOST_CA_BUNDLE, EmbeddedService, free_port, wait_for
from tests.infra import TEST_LABEL, Infra

BUILD_TIMEOUT = 600
SCORE_PY = """
import json, os, pickle

def init():
    global model
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.pkl"), "rb") as f:
        model = pickle.load(f)

def run(raw_data):
    return model.predict(json.loads(raw_data)["data"]).tolist()
"""
ECHO_SCORE = "def init():\n    pass\n\ndef run(raw_data):\n    return {'echo': raw_data}\n"


@dataclass
class Stack:
    api: str
    headers: dict[str, str]
    env: dict[str, str]
    workers: list[subprocess.Popen]
    log_dir: Path
    hook_port: int = 0  # the workers may send webhooks to 127.0.0.1 on this port
    scoring_url: str = ""  # the scoring gateway, once start_web_services() ran

    def start_worker(self, *extra: str) -> subprocess.Popen:
        return self._start("worker", [sys.executable, "-m", "workers", "worker", "--concurrency", "1", *extra])

    def start_web_services(self) -> None:
        """A deploy worker (the reconciler) and the scoring gateway, once per stack."""
        if self.scoring_url:
            return
        self.start_worker("--deploy")
        gateway = self._start("gateway", [sys.executable, "-m", "workers", "gateway"])
        wait_for(f"{self.env['MMS_SCORING_URL']}/health", gateway)
        self.scoring_url = self.env["MMS_SCORING_URL"]

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.workers)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.workers.append(process)
        return process


def running_stack(
    infra: Infra,
    service_context: ServiceContext,
    tmp_path_factory: pytest.TempPathFactory,
    *,
    allow_hosts: Sequence[str] = (),
) -> Iterator[Stack]:
    """`mms serve` and `mms worker` against the test database, Redis, the engine and the registry
    (the `stack` fixture of tests/workers/conftest.py); ``allow_hosts``: more private hosts the
    service may reach (MMS_FETCH_ALLOW_HOSTS: a tenant's swarm in a test's network namespace)."""
    settings = service_context.settings
    port, hook_port, gateway_port = free_port(), free_port(), free_port()
    # Its own Redis database (flushed here): MMS_TEST_STACK_REDIS_URL lets two test sessions on one
    # machine run stacks side by side.
    broker = os.environ.get("MMS_TEST_STACK_REDIS_URL", "redis://127.0.0.1:6379/14")
    redis.Redis.from_url(broker).flushdb()
    log_dir = tmp_path_factory.mktemp("stack-logs")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MMS_")},
        "MMS_DATABASE_URL": settings.resolved_database_url,
        "MMS_SECRET_KEY": settings.secret_key or "",
        "MMS_DATA_DIR": str(tmp_path_factory.mktemp("stack-data")),
        "MMS_AUTO_MIGRATE": "false",
        "MMS_PORT": str(port),
        "MMS_BROKER_URL": broker,
        "MMS_BUILD_QUEUE": f"mms-test-{uuid.uuid4().hex[:8]}",
        "MMS_DEPLOY_QUEUE": f"mms-test-deploy-{uuid.uuid4().hex[:8]}",
        # Web services (started by the tests that deploy: Stack.start_web_services).
        "MMS_WEB_SERVICES_PREVIEW": "true",
        "MMS_SCORING_URL": f"http://127.0.0.1:{gateway_port}",
        "MMS_GATEWAY_PORT": str(gateway_port),
        # The built-in `swarm` target: the same engine, in swarm mode once a test made it one
        # (tests/workers/deploy/test_swarm.py); until then its passes find no swarm.
        "MMS_SWARM_DOCKER_HOST": infra.docker_host,
        "MMS_REGISTRY": infra.registry,
        "MMS_DEFAULT_BASE_IMAGE": infra.base_image,
        "MMS_BUILD_LEASE_SECONDS": "6",
        "MMS_BUILD_SHUTDOWN_GRACE_SECONDS": "1",
        # The webhook receiver, and the password registry as a tenant's private registry
        # (the open one is the service's own: allowed without listing it).
        "MMS_FETCH_ALLOW_HOSTS": json.dumps([f"127.0.0.1:{hook_port}", infra.auth_registry, *allow_hosts]),
        "MMS_LOG_FORMAT": "text",
        "DOCKER_HOST": infra.docker_host,
        # docker builds' RUN steps: the contained network and its egress proxy to PyPI.
        "MMS_BUILD_NETWORK": infra.build_network,
        "MMS_BUILD_PROXY": infra.build_proxy or "",
    }
    if HOST_CA_BUNDLE.is_file():  # this machine reaches PyPI through a TLS-inspecting proxy
        env["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    server_log = open(log_dir / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"], env=env, stdout=server_log, stderr=subprocess.STDOUT
    )
    server_log.close()
    api = f"http://127.0.0.1:{port}"
    stack = Stack(api=api, headers={}, env=env, workers=[], log_dir=log_dir, hook_port=hook_port)
    try:
        wait_for(f"{api}/health", server)
        with session_scope(service_context.session_factory) as session:
            principal, secret = create_service_principal(
                session, issuer=settings.issuer, display_name="e2e", role="Owner", scope="/", created_by=None
            )
            client_id = principal.client_id
        token = httpx.post(
            f"{api}/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        ).json()["access_token"]
        stack.headers = {"Authorization": f"Bearer {token}"}
        stack.start_worker()
        yield stack
    finally:
        for process in [*stack.workers, server]:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


class Account:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.url = f"{stack.api}/api/subscriptions/e2e/resourceGroups/rg/accounts/a-{uuid.uuid4().hex[:8]}"
        self.call("PUT", self.url, json={"location": "eastus2", "sku": {"name": "S1"}})

    def call(self, method: str, url: str, **kwargs) -> httpx.Response:
        response = httpx.request(
            method, url, headers={**self.stack.headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs
        )
        assert response.status_code < 400, f"{method} {url}: {response.status_code} {response.text}"
        return response

    def status(self, method: str, url: str) -> int:
        """The status of a request that may fail (no assertion)."""
        return httpx.request(method, url, headers=self.stack.headers, timeout=60).status_code

    def upload(self, name: str, data: bytes) -> str:
        return self.call("POST", f"{self.url}/assets", params={"name": name}, content=data).json()["url"]

    def manifest(self, model_id: str | None, score: str, requirements: str, name: str = "e2e-manifest") -> str:
        body = {
            "name": name,
            "driverProgram": "score",
            "modelIds": [model_id] if model_id else [],
            "assets": [
                {"id": "score", "url": self.upload("score.py", score.encode()), "mimeType": "application/x-python"}
            ],
            "targetRuntime": {
                "runtimeType": "Python",
                "properties": {"pipRequirements": self.upload("requirements.txt", requirements.encode())},
            },
        }
        return self.call("POST", f"{self.url}/manifests", json=body).json()["id"]

    def build(self, manifest_id: str, name: str, builder: str | None = None) -> dict:
        body = {"name": name, "manifestId": manifest_id, "imageType": "Docker"}
        if builder:
            body["builder"] = builder
        created = self.call("POST", f"{self.url}/images", json=body)
        assert created.status_code == 202
        assert created.json()["CreationState"] == "NotStarted"
        operation = created.headers["Operation-Location"]
        assert self.call("GET", operation).json()["state"] in ("NotStarted", "Running", "Succeeded", "Failed")
        return created.json()

    def wait(self, image_id: str, seconds: float = BUILD_TIMEOUT) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            image = self.call("GET", f"{self.url}/images/{image_id}").json()
            if image["CreationState"] in ("Succeeded", "Failed", "Cancelled"):
                return image
            time.sleep(1)
        raise AssertionError(f"image {image_id} did not finish in {seconds} s: {image}")

    def wait_running(self, image_id: str, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while self.call("GET", f"{self.url}/images/{image_id}").json()["CreationState"] != "Running":
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.2)

    def log(self, image: dict) -> str:
        return self.call("GET", image["ImageBuildLogUri"]).text


def embedded_account(service: EmbeddedService) -> Account:
    """An account on the embedded default's `mms serve` (its own worker: none to start here)."""
    stack = Stack(
        api=service.url,
        headers={"Authorization": f"Bearer {service.token()}"},
        env=service.env,
        workers=[],
        log_dir=service.log_dir,
    )
    return Account(stack)


def register_model(account: Account, archive: bytes) -> str:
    url = account.upload("housing.zip", archive)
    body = {"name": "housing.model", "tags": ["e2e"], "url": url, "mimeType": "application/zip", "unpack": True}
    return account.call("POST", f"{account.url}/models", json=body).json()["id"]


def sklearn_requirements() -> str:
    import sklearn

    return f"scikit-learn=={sklearn.__version__}\n"


def run_and_score(api, image_location: str, rows: list) -> httpx.Response:
    """Start the image on the host network, POST ``rows`` to /score once it answers, remove it."""
    port = free_port()
    container = api.create_container(
        image_location,
        environment={"PORT": str(port)},
        labels={TEST_LABEL: "1"},
        host_config=api.create_host_config(network_mode="host"),
    )
    api.start(container)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                return httpx.post(f"http://127.0.0.1:{port}/score", json={"data": rows}, timeout=5)
            except httpx.TransportError:
                assert time.monotonic() < deadline, api.logs(container).decode()[-2000:]
                time.sleep(0.5)
    finally:
        api.remove_container(container, force=True)
