"""The CLI's calls survive a service that drops a connection or answers 503 for a moment;
a call that is not safe to repeat is sent once, and a create is sent with a key that makes it
safe."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from app.context import ServiceContext
from mms_client import operations
from mms_client.api import ServiceClient, ServiceError, fetch_token
from mms_client.operations import Uploads
from mms_client.profile import ConfigStore, Profile
from tests.api.test_manifests import seed_manifest
from tests.factories import model_body
from tests.listeners import answer_losing_proxy, flaky_http_server
from tests.live_server import live_service


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ConfigStore:
    monkeypatch.setenv("MMS_TOKEN", "a-token")
    return ConfigStore(tmp_path / "config")


def _client(store: ConfigStore, url: str, monkeypatch: pytest.MonkeyPatch) -> ServiceClient:
    monkeypatch.setenv("MMS_SERVER", url)
    client = ServiceClient(store)
    client.retry_wait = 0.01
    return client


def test_a_get_is_retried_after_a_drop_and_a_503(env, monkeypatch) -> None:
    with (
        flaky_http_server(b'{"ok": true}', ["drop", (503, [("Retry-After", "0")])]) as server,
        _client(env, server.url, monkeypatch) as client,
    ):
        assert client.json("GET", "/api/things") == {"ok": True}
    assert server.seen == [("GET", "/api/things")] * 3


def test_a_post_is_sent_once_unless_it_has_an_idempotency_key(env, monkeypatch) -> None:
    with flaky_http_server(b'{"id": 1}', [(503, [])]) as server, _client(env, server.url, monkeypatch) as client:
        with pytest.raises(ServiceError, match="503"):
            client.json("POST", "/api/things", json={})
        assert len(server.seen) == 1
        server.failures.append((502, []))
        assert client.json("POST", "/api/things", json={}, headers={"Idempotency-Key": "k1"}) == {"id": 1}
        assert len(server.seen) == 3


def test_a_service_that_stays_down_fails_after_a_bounded_few_tries(env, monkeypatch) -> None:
    with flaky_http_server(b"{}", [(503, [])] * 10) as server, _client(env, server.url, monkeypatch) as client:
        client.tries = 3
        with pytest.raises(ServiceError, match="503"):
            client.json("GET", "/api/things")
    assert len(server.seen) == 3


def test_the_token_request_is_retried_after_a_503(env, monkeypatch) -> None:
    body = b'{"access_token": "fresh", "expires_in": 600}'
    with flaky_http_server(body, [(503, [("Retry-After", "0")])]) as server:
        token, expires_at = fetch_token(f"{server.url}/oauth2/token", "id", "secret", None)
    assert token == "fresh" and expires_at > 0
    assert server.seen == [("POST", "/oauth2/token")] * 2


def test_a_create_whose_answer_is_lost_is_sent_again_with_its_key_and_makes_one(
    service_context: ServiceContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mms model register` and `mms image create` against the real service, through a proxy
    that cuts the connection after the service registered the model (then queued the build):
    the client sends the call again with the same Idempotency-Key and gets the first answer."""
    model_file = tmp_path / "housing.pkl"
    model_file.write_bytes(b"a model")
    with live_service(service_context, tmp_path / "data") as live:
        account = live.account()
        manifest = httpx.post(
            f"{account}/manifests",
            json=seed_manifest(httpx.post(f"{account}/models", json=model_body(), headers=live.headers).json()["id"]),
            headers=live.headers,
        ).json()

        def creates(method: str, path: str) -> bool:
            return method == "POST" and urlsplit(path).path.endswith(("/models", "/images"))

        with answer_losing_proxy(live.base, creates) as proxy:
            monkeypatch.setenv("MMS_SERVER", proxy.url)  # type: ignore[attr-defined]
            monkeypatch.setenv("MMS_TOKEN", live.headers["Authorization"].removeprefix("Bearer "))
            store = ConfigStore(tmp_path / "config")
            subscription, group, name = (urlsplit(account).path.split("/")[i] for i in (3, 5, 7))
            store.save_profile(Profile(subscription=subscription, resource_group=group, account=name))
            with ServiceClient(store) as client, Uploads(client) as uploads:
                client.retry_wait = 0.01
                registered = operations.register_model(client, model_file, "lost-answer", [], None, uploads)
                proxy.lose = creates  # type: ignore[attr-defined]
                image = operations.create_image(client, "lost-answer-image", manifest["id"])

        for route, made in (("models", registered), ("images", image)):
            sent = [key for method, path, key in proxy.seen if creates(method, path) and f"/{route}" in path]  # type: ignore[attr-defined]
            assert len(sent) == 2 and sent[0] == sent[1] is not None, sent
            listed = httpx.get(f"{account}/{route}", headers=live.headers).json()["value"]
            named = [item for item in listed if item.get("name", item.get("Name", "")).startswith("lost-answer")]
            assert [item.get("id", item.get("Id")) for item in named] == [made.get("id", made.get("Id"))]
        assert registered["version"] == 1 and image["Version"] == 1
