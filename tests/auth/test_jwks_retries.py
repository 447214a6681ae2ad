"""An external issuer's JWKS URL that fails for a moment does not turn valid tokens away."""

from __future__ import annotations

import json
import time

from app.auth.keys import JWKS_MAX_BYTES, RemoteKeySource
from tests.external_issuer import ExternalIssuer
from tests.listeners import bounded_read, endless_http_server, flaky_http_server


def test_a_jwks_load_survives_a_503_and_a_dropped_connection() -> None:
    issuer = ExternalIssuer("https://login.example.test/tenant/v2.0")
    kid = issuer.jwks["keys"][0]["kid"]
    with flaky_http_server(json.dumps(issuer.jwks).encode(), [(503, [("Retry-After", "0")]), "drop"]) as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=0)
        assert keys.public_key(kid) is not None
    assert len(server.seen) == 3


def test_a_jwks_url_that_stays_down_gives_no_key_after_a_bounded_few_tries() -> None:
    issuer = ExternalIssuer("https://login.example.test/tenant/v2.0")
    kid = issuer.jwks["keys"][0]["kid"]
    with flaky_http_server(json.dumps(issuer.jwks).encode(), [(502, [])] * 10) as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=0)
        assert keys.public_key(kid) is None  # a 401 for the caller, never a 500
    assert len(server.seen) == 3


def test_a_jwks_url_that_streams_without_end_is_cut_off_at_1_mib(caplog) -> None:  # type: ignore[no-untyped-def]
    with endless_http_server() as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=0)
        error, seconds, peak = bounded_read(lambda: keys.public_key("some-kid") or _none())
        assert server.hung_up.wait(5)
    assert isinstance(error, LookupError)  # no key: a 401 for the caller
    assert seconds < 5
    assert peak < 4 * JWKS_MAX_BYTES
    assert server.seen == ["/keys"]  # too large is not worth another try
    assert "the JWKS document exceeds the limit of 1 MiB" in caplog.text


def _none() -> None:
    raise LookupError("no key")


def test_a_jwks_document_that_trickles_in_is_given_up_on_at_the_loads_deadline(caplog) -> None:  # type: ignore[no-untyped-def]
    with endless_http_server(chunk_size=16, chunk_delay=0.1) as server:
        keys = RemoteKeySource(f"{server.url}/keys", refresh_min_seconds=0, timeout=0.5)
        started = time.monotonic()
        assert keys.public_key("some-kid") is None
        assert time.monotonic() - started < 2.5  # the load's deadline: twice its timeout
    assert "the JWKS document took too long to arrive" in caplog.text
