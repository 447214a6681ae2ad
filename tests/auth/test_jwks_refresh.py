"""An external issuer's JWKS is loaded once however many requests meet an unknown kid at
the same moment, no more often than the refresh period however many made-up kids arrive,
and requests whose key is known never wait for a load.

A real HTTP server on 127.0.0.1 serves the JWKS slowly and counts what it is asked."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from app.auth.keys import RemoteKeySource
from tests.external_issuer import ExternalIssuer
from tests.listeners import flaky_http_server

ISSUER = ExternalIssuer("https://login.example.test/tenant/v2.0")
KID = ISSUER.jwks["keys"][0]["kid"]
REQUESTS = 24


def _at_once(keys: RemoteKeySource, kids: list[str]) -> list[dict | None]:
    """``public_key`` for each kid, on threads released together (as concurrent requests)."""
    start = threading.Barrier(len(kids))

    def ask(kid: str) -> dict | None:
        start.wait(5)
        return keys.public_key(kid)

    with ThreadPoolExecutor(len(kids)) as pool:
        return list(pool.map(ask, kids, timeout=30))


def test_concurrent_requests_with_an_unknown_kid_share_one_load() -> None:
    with flaky_http_server(json.dumps(ISSUER.jwks).encode(), [], delay=0.5) as server:
        # No rate limit: only the sharing keeps this to one load.
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=0)
        found = _at_once(keys, [KID] * REQUESTS)
        assert all(key is not None and key["kid"] == KID for key in found)
        assert len(server.seen) == 1

        missing = _at_once(keys, [f"made-up-{n}" for n in range(REQUESTS)])
        assert missing == [None] * REQUESTS
        assert len(server.seen) == 2  # one more load, shared by all


def test_unknown_kids_load_no_more_than_once_per_refresh_period() -> None:
    with flaky_http_server(json.dumps(ISSUER.jwks).encode(), []) as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=60)
        assert keys.public_key(KID) is not None
        started = time.monotonic()
        for n in range(200):
            assert keys.public_key(f"made-up-{n}") is None
        assert time.monotonic() - started < 1  # answered at once, no load waited for
        assert len(server.seen) == 1


def test_a_failed_load_counts_too_so_a_down_issuer_is_not_hammered() -> None:
    with flaky_http_server(b"", [(500, [])] * 100) as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=60)
        assert _at_once(keys, [KID] * REQUESTS) == [None] * REQUESTS
        assert len(server.seen) == 3  # one load, its bounded few tries
        assert keys.public_key(KID) is None
        assert len(server.seen) == 3


def test_a_known_kid_is_answered_while_a_slow_load_is_in_flight() -> None:
    with flaky_http_server(json.dumps(ISSUER.jwks).encode(), [], delay=1.5) as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=0)
        assert keys.public_key(KID) is not None
        slow = threading.Thread(target=keys.public_key, args=("rotated-in",))
        slow.start()
        while len(server.seen) < 2:
            time.sleep(0.01)
        started = time.monotonic()
        assert keys.public_key(KID) is not None
        assert time.monotonic() - started < 0.1
        slow.join(10)
