"""A registry that streams without end (a hostile base image's registry) cannot make the
client read more than a manifest's, a token's or a config's cap: the read stops there,
promptly, in bounded memory, with an error naming the cap.

A real HTTP server on 127.0.0.1 plays the registry; its endless answers give up after
512 MiB, so that a client without a cap fails the test rather than hang it.
"""

from __future__ import annotations

import hashlib
from http.server import BaseHTTPRequestHandler

from tests.listeners import bounded_read, endless_http_server
from workers.oci.remote_registry import (
    CONFIG_MAX_BYTES,
    MANIFEST_MAX_BYTES,
    TOKEN_MAX_BYTES,
    RemoteRegistryClient,
    RemoteRegistryError,
)

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def test_an_endless_manifest_is_cut_off_at_4_mib() -> None:
    with (
        endless_http_server(content_type=MANIFEST_TYPE) as registry,
        RemoteRegistryClient(registry.address, retry_wait=0.01) as client,
    ):
        error, seconds, peak = bounded_read(lambda: client.get_manifest("mms/base", "1"))
        assert registry.hung_up.wait(5)
    assert isinstance(error, RemoteRegistryError)
    assert "/mms/base:1: the manifest exceeds the limit of 4 MiB" in str(error)
    assert not error.transient  # not asked again: it would only stream again
    assert registry.seen == ["/v2/mms/base/manifests/1"]
    assert seconds < 5
    assert peak < 3 * MANIFEST_MAX_BYTES
    assert registry.sent < 8 * MANIFEST_MAX_BYTES


def test_an_endless_token_is_cut_off_at_1_mib() -> None:
    def challenge(h: BaseHTTPRequestHandler) -> bool:
        if h.path.startswith("/token"):
            return False
        realm = f"http://{h.server.address}/token"  # type: ignore[attr-defined]
        h.send_response(401)
        h.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="test"')
        h.send_header("Content-Length", "0")
        h.end_headers()
        return True

    with (
        endless_http_server(answer_first=challenge) as registry,
        RemoteRegistryClient(registry.address, retry_wait=0.01) as client,
    ):
        error, seconds, peak = bounded_read(lambda: client.get_manifest("mms/base", "1"))
    assert "token service of 127.0.0.1" in str(error)
    assert "the token exceeds the limit of 1 MiB" in str(error)
    assert seconds < 5
    assert peak < 3 * TOKEN_MAX_BYTES + (1 << 20)
    assert registry.sent < 8 * TOKEN_MAX_BYTES


def test_an_endless_config_blob_is_cut_off_at_its_cap() -> None:
    digest = f"sha256:{hashlib.sha256(b'{}').hexdigest()}"
    with endless_http_server() as registry, RemoteRegistryClient(registry.address, retry_wait=0.01) as client:
        error, seconds, peak = bounded_read(lambda: client.get_blob("mms/base", digest))
    assert f"blob {digest} exceeds the limit of {CONFIG_MAX_BYTES >> 20} MiB" in str(error)
    assert seconds < 5
    assert peak < 3 * CONFIG_MAX_BYTES
    assert len(registry.seen) == 1


def test_an_endless_error_answer_is_read_no_further_than_its_first_bytes() -> None:
    with endless_http_server(status=404) as registry, RemoteRegistryClient(registry.address, retry_wait=0.01) as client:
        error, seconds, peak = bounded_read(lambda: client.get_manifest("mms/base", "1"))
    assert isinstance(error, RemoteRegistryError)
    assert error.status == 404 and "not found" in str(error)
    assert seconds < 5
    assert peak < 4 << 20
    assert registry.sent < 8 * MANIFEST_MAX_BYTES


def test_a_manifest_that_trickles_in_fails_at_the_clients_timeout() -> None:
    # 16 bytes every 0.1 s: each read is quick, the whole would take days.
    with (
        endless_http_server(content_type=MANIFEST_TYPE, chunk_size=16, chunk_delay=0.1) as registry,
        RemoteRegistryClient(registry.address, retry_wait=0.01, timeout=1.0) as client,
    ):
        error, seconds, _ = bounded_read(lambda: client.get_manifest("mms/base", "1"))
    assert isinstance(error, RemoteRegistryError)
    assert "the manifest took too long to arrive" in str(error)
    assert 1.0 <= seconds < 3
