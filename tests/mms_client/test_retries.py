"""The CLI's calls survive a service that drops a connection or answers 503 for a moment;
a call that is not safe to repeat is sent once."""

from __future__ import annotations

from pathlib import Path

import pytest

from mms_client.api import ServiceClient, ServiceError, fetch_token
from mms_client.profile import ConfigStore
from tests.listeners import flaky_http_server


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
