"""Real concurrency against a live server (two processes), on PostgreSQL and SQLite: versions,
idempotency, service names and service changes hold."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import update

from app.context import ServiceContext
from app.database import session_scope
from app.deployments.states import ServiceState
from app.deployments.transitions import Transition, move
from app.orm import Account, Image, Service
from app.services.principals import create_service_principal
from tests.factories import SEED_MODEL, new_image_row


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(service_context: ServiceContext) -> Iterator[str]:
    """`mms serve` with two processes on the test database, as in production."""
    settings = service_context.settings
    port = _free_port()
    env = {
        **os.environ,
        "MMS_DATABASE_URL": settings.resolved_database_url,
        "MMS_SECRET_KEY": settings.secret_key or "",
        "MMS_DATA_DIR": str(settings.data_dir),
        "MMS_AUTO_MIGRATE": "false",
        "MMS_LOG_LEVEL": "WARNING",
        "MMS_WEB_SERVICES_PREVIEW": "true",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        if process.stderr:
            process.stderr.close()


@pytest.fixture(scope="module")
def owner_token(live_server: str, service_context: ServiceContext) -> str:
    with session_scope(service_context.session_factory) as session:
        principal, secret = create_service_principal(
            session,
            issuer=service_context.settings.issuer,
            display_name="load",
            role="Owner",
            scope="/",
            created_by=None,
        )
        client_id = principal.client_id
    response = httpx.post(
        f"{live_server}/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )
    return response.json()["access_token"]


def _account(live_server: str, token: str) -> tuple[str, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{live_server}/api/subscriptions/sub-live/resourceGroups/rg-live/accounts/a-{uuid.uuid4().hex[:8]}"
    assert httpx.put(url, json={"location": "eastus2", "sku": {"name": "S1"}}, headers=headers).status_code == 201
    return url, headers


def test_fifty_concurrent_registrations_get_versions_one_to_fifty(live_server: str, owner_token: str) -> None:
    url, headers = _account(live_server, owner_token)
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=50)) as client, ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: client.post(f"{url}/models", json=SEED_MODEL, headers=headers), range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 51))
    listed = httpx.get(f"{url}/models?count=1000", headers=headers).json()["value"]
    assert sorted(m["version"] for m in listed) == list(range(1, 51))


def test_concurrent_retries_with_one_idempotency_key_make_one_model(live_server: str, owner_token: str) -> None:
    url, headers = _account(live_server, owner_token)
    keyed = {**headers, "Idempotency-Key": f"retry-{uuid.uuid4()}"}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: client.post(f"{url}/models", json=SEED_MODEL, headers=keyed), range(10)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(httpx.get(f"{url}/models", headers=headers).json()["value"]) == 1


def test_an_upload_cut_off_half_way_leaves_nothing_behind(
    live_server: str, owner_token: str, service_context: ServiceContext
) -> None:
    url, headers = _account(live_server, owner_token)
    path = httpx.URL(f"{url}/assets?name=cut.zip")
    with socket.create_connection(("127.0.0.1", path.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path.raw_path.decode()} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {headers['Authorization']}\r\nContent-Type: application/zip\r\n"
            f"Content-Length: {10 * 1024 * 1024}\r\n\r\n".encode()
            + b"x" * 300_000
        )
        incoming = service_context.settings.data_dir / "incoming"
        deadline = time.monotonic() + 10
        while not list(incoming.glob(".upload-*")):  # the server is streaming to a temporary file
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while list(incoming.glob(".upload-*")):
        assert time.monotonic() < deadline, "the cut-off upload's temporary file stayed"
        time.sleep(0.1)
    assets = service_context.settings.data_dir / "assets" / "objects"
    assert not list(assets.rglob("cut.zip"))


def _deployable_image(service_context: ServiceContext) -> tuple[str, str]:
    """A Succeeded image committed in an account of its own: the account's API path, the image id."""
    with session_scope(service_context.session_factory) as session:
        image = new_image_row(session)
        session.execute(update(Image).where(Image.id == image.id).values(state="Succeeded"))
        account = session.get_one(Account, image.account_id)
        path = f"/api/subscriptions/{account.subscription_id}/resourceGroups/{account.resource_group}"
        return f"{path}/accounts/{account.name}", str(image.id)


def test_concurrent_creates_of_one_service_name_make_one_service(
    live_server: str, owner_token: str, service_context: ServiceContext
) -> None:
    path, image_id = _deployable_image(service_context)
    headers = {"Authorization": f"Bearer {owner_token}"}
    body = {"name": "raced", "imageId": image_id}
    with httpx.Client(base_url=live_server, timeout=60) as client, ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: client.post(f"{path}/services", json=body, headers=headers), range(10)))
    assert sorted(r.status_code for r in responses) == [202] + [409] * 9, [r.text for r in responses]
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"ServiceExists"}
    assert len(httpx.get(f"{live_server}{path}/services", headers=headers).json()["value"]) == 1


def test_concurrent_changes_of_a_settled_service_apply_one(
    live_server: str, owner_token: str, service_context: ServiceContext
) -> None:
    path, image_id = _deployable_image(service_context)
    headers = {"Authorization": f"Bearer {owner_token}"}
    created = httpx.post(f"{live_server}{path}/services", json={"name": "scaled", "imageId": image_id}, headers=headers)
    service_id = created.json()["id"]
    with session_scope(service_context.session_factory) as session:  # what the reconciler will report
        assert move(session, Transition.CONVERGE, Service.id == uuid.UUID(service_id), to=ServiceState.HEALTHY)
    url = f"{path}/services/{service_id}"
    with httpx.Client(base_url=live_server, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda n: client.patch(url, json={"numReplicas": n % 3 + 1}, headers=headers), range(8))
        )
    assert sorted(r.status_code for r in responses) == [202] + [409] * 7, [r.text for r in responses]
    applied = next(r.json() for r in responses if r.status_code == 202)
    shown = httpx.get(f"{live_server}{url}", headers=headers).json()
    assert (shown["numReplicas"], shown["operationId"]) == (applied["numReplicas"], applied["operationId"])
