"""A swarm service's pull token is renewed before it expires (workers/deploy/swarm.py
``renew_pull_auth``): a node that gets a task later (a replica replaced there, a scale-up) pulls
the image with the auth its swarm service holds, and a pull token lives ENGINE_PULL_TOKEN_SECONDS.
Against the TLS engine on 127.0.0.1 of test_tenant_swarm_bounds.py: what the driver sends; the
real engine's side (no running task restarted for it) is in test_multinode_swarm.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.workers.deploy.specs import swarm_spec
from tests.workers.deploy.test_tenant_swarm_bounds import _driver, _Engine, certs, serving_tls  # noqa: F401
from workers.deploy.local import GENERATION_LABEL, INSTALLATION_LABEL, SERVICE_LABEL
from workers.deploy.swarm import PULL_AUTH_LABEL, PULL_AUTH_RENEW_SECONDS


def _service(pull_auth_at: float | str | None) -> dict:
    labels = {GENERATION_LABEL: "1", INSTALLATION_LABEL: "test", SERVICE_LABEL: str(swarm_spec().id)}
    if pull_auth_at is not None:
        labels[PULL_AUTH_LABEL] = str(pull_auth_at)
    template = {"ContainerSpec": {"Image": "registry.example.com/mms/a/b@sha256:" + "0" * 64}}
    return {"ID": "s1", "Spec": {"Name": "x", "Labels": labels, "TaskTemplate": template}, "Version": {"Index": 7}}


@pytest.fixture()
def engine(certs: dict[str, str]) -> Iterator[tuple[int, list[dict], list[dict]]]:  # noqa: F811
    """An engine listing one swarm service (set the first item of the yielded ``listed``); its
    port, and the updates it was sent (path, query, headers, body)."""
    listed: list[dict] = [_service(None)]
    updates: list[dict] = []

    class Engine(_Engine):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            path = urlsplit(self.path)
            if path.path.endswith("/services/s1/update"):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                updates.append({"query": parse_qs(path.query), "headers": dict(self.headers), "body": json.loads(body)})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                return
            super().do_GET()

    Engine.hostile = staticmethod(
        lambda path: (
            (200, {}, json.dumps(listed).encode())
            if path == "/services"
            else ((200, {}, b"[]") if path == "/tasks" else None)
        )
    )
    with serving_tls(Engine, certs) as port:
        yield port, listed, updates


def test_a_serving_generations_pull_token_is_renewed_once_older_than_the_bound(
    engine: tuple[int, list[dict], list[dict]],
    certs: dict[str, str],  # noqa: F811
) -> None:
    port, listed, updates = engine
    token = {"registrytoken": "fresh-token"}
    for pull_auth_at, renewed in [
        (None, True),  # made before the label: renewed
        ("not a time", True),
        (time.time() - PULL_AUTH_RENEW_SECONDS - 5, True),
        (time.time() - 5, False),  # renewed a moment ago
    ]:
        listed[0] = _service(pull_auth_at)
        updates.clear()
        driver = _driver(port, certs)
        try:
            driver.observe(swarm_spec())
            driver.renew_pull_auth(token)
        finally:
            driver.close()
        assert bool(updates) is renewed, (pull_auth_at, updates)
        if not renewed:
            continue
        (update,) = updates
        assert update["query"] == {"version": ["7"]}  # the version read: an update made meanwhile conflicts
        sent = json.loads(base64.urlsafe_b64decode(update["headers"]["X-Registry-Auth"]))
        assert sent == {"registrytoken": "fresh-token", "serveraddress": "registry.example.com"}
        labels = update["body"]["Labels"]
        assert time.time() - float(labels[PULL_AUTH_LABEL]) < 60
        # Nothing else of the service changes (its task template, hence no task restarted).
        assert update["body"]["TaskTemplate"] == listed[0]["Spec"]["TaskTemplate"]
        assert {k: v for k, v in labels.items() if k != PULL_AUTH_LABEL} == {
            k: v for k, v in listed[0]["Spec"]["Labels"].items() if k != PULL_AUTH_LABEL
        }


def test_no_pull_auth_no_update(engine: tuple[int, list[dict], list[dict]], certs: dict[str, str]) -> None:  # noqa: F811
    port, _, updates = engine
    driver = _driver(port, certs)
    try:
        driver.observe(swarm_spec())
        driver.renew_pull_auth({})  # the operator's registry login: never sent to be renewed
    finally:
        driver.close()
    assert updates == []
