"""The app served by a real uvicorn on a free loopback port, in a thread of the test process,
and a small client for tests that need committed data and a real connection (streams, webhooks)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import delete

from app.context import ServiceContext
from app.database import session_scope
from app.main import create_app
from app.orm import RoleAssignment, ServicePrincipal
from app.services.principals import create_service_principal
from tests.api.test_manifests import seed_manifest
from tests.embedded_service import free_port
from tests.factories import account_url, bearer, model_body
from tests.sse import Listener


@contextmanager
def serve(app: FastAPI, port: int, *, lifespan: str = "on") -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:``port`` until the block ends; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan, timeout_graceful_shutdown=5
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@dataclass
class Live:
    base: str
    context: ServiceContext
    headers: dict[str, str]
    principals: list[str] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)

    def credentials(self, role: str, scope: str) -> tuple[str, str]:
        """A new service principal's client id and secret (removed after the test)."""
        with session_scope(self.context.session_factory) as session:
            principal, secret = create_service_principal(
                session,
                issuer=self.context.settings.issuer,
                display_name=f"live-{role}",
                role=role,
                scope=scope,
                created_by=None,
            )
            client_id = principal.client_id
        self.principals.append(client_id)
        return client_id, secret

    def token(self, role: str, scope: str) -> dict[str, str]:
        client_id, secret = self.credentials(role, scope)
        answer = httpx.post(
            f"{self.base}/oauth2/token",
            data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        )
        assert answer.status_code == 200, answer.text
        return bearer(answer.json()["access_token"])

    def account(self) -> str:
        """A new account with a manifest; returns its URL."""
        url = self.base + account_url("sub-live", "rg-live", f"acct-{uuid.uuid4().hex[:8]}")
        assert (
            httpx.put(
                url, json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}}, headers=self.headers
            ).status_code
            == 201
        )
        self.accounts.append(url)
        return url

    def image(self, account: str, name: str = "events-image") -> dict:
        model = httpx.post(f"{account}/models", json=model_body(), headers=self.headers).json()
        manifest = httpx.post(f"{account}/manifests", json=seed_manifest(model["id"]), headers=self.headers).json()
        created = httpx.post(
            f"{account}/images",
            headers=self.headers,
            json={"name": name, "manifestId": manifest["id"], "imageType": "Docker"},
        )
        assert created.status_code == 202, created.text
        return created.json()

    def listen(self, account: str, headers: dict[str, str] | None = None) -> Listener:
        return Listener(f"{account}/images/events", headers or self.headers)


@contextmanager
def live_service(service_context: ServiceContext, data_dir: Path, **settings: object) -> Iterator[Live]:
    """The app on the test database (committed, not rolled back) with an Owner signed in."""
    port = free_port()
    changed = service_context.settings.model_copy(
        update={"public_url": f"http://127.0.0.1:{port}", "data_dir": data_dir, **settings}
    )
    # An engine of its own: the app disposes its engine when it stops, and the session's must live on.
    context = ServiceContext.build(changed)
    with serve(create_app(context=context), port) as base:
        live = Live(base, context, {})
        live.headers = live.token("Owner", "/subscriptions/sub-live")
        try:
            yield live
        finally:
            _clean_up(live)


def _clean_up(live: Live) -> None:
    """Remove what the test committed, so later tests see the database as they expect it."""
    for url in live.accounts:
        assert httpx.delete(f"{url}?force=true", headers=live.headers).status_code == 204
    with session_scope(live.context.session_factory) as session:
        session.execute(delete(RoleAssignment).where(RoleAssignment.subject.in_(live.principals)))
        session.execute(delete(ServicePrincipal).where(ServicePrincipal.client_id.in_(live.principals)))
