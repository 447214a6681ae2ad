"""The registry client against a registry that fails for a while: dropped connections, 5xx,
429 with Retry-After, a blob cut off mid-download, and bearer tokens that expire.

A real HTTP server on 127.0.0.1 plays the registry (and its token service); each route
answers from a script of failures, then succeeds, and records every request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from app.config import Settings
from workers.builders.docker import _blob_copier
from workers.builders.oci import OciBuilder
from workers.oci.layers import LayerBuilder
from workers.oci.media import OCI_MANIFEST
from workers.oci.remote_registry import RemoteRegistryClient, RemoteRegistryError

CONFIG = b'{"architecture":"amd64","os":"linux"}'
CONFIG_DIGEST = f"sha256:{hashlib.sha256(CONFIG).hexdigest()}"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": CONFIG_DIGEST,
            "size": len(CONFIG),
        },
        "layers": [],
    }
).encode()
BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DIGEST = f"sha256:{hashlib.sha256(BLOB).hexdigest()}"

Step = Callable[[BaseHTTPRequestHandler], None]


def answer(status: int, data: bytes = b"", *headers: tuple[str, str]) -> Step:
    def step(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    return step


def drop(h: BaseHTTPRequestHandler) -> None:
    """Close the connection without an answer."""
    h.close_connection = True
    h.connection.close()


def cut_off(data: bytes) -> Step:
    """Promise the whole blob, send half of it, close."""

    def step(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: len(data) // 2])
        h.wfile.flush()
        h.close_connection = True
        h.connection.close()

    return step


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        elif self.headers.get("Transfer-Encoding") == "chunked":
            while size := int(self.rfile.readline().strip() or b"0", 16):
                self.rfile.read(size + 2)
            self.rfile.readline()
        srv: FlakyRegistry = self.server  # type: ignore[assignment]
        key = f"{self.command} {self.path.split('?', 1)[0]}"
        srv.seen.append((key, self.headers.get("Authorization")))
        if srv.token_check is not None and not key.startswith("GET /token"):
            refusal = srv.token_check(self)
            if refusal is not None:
                return refusal(self)
        steps = srv.routes.get(key)
        if not steps:
            return answer(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')(self)
        (steps.pop(0) if len(steps) > 1 else steps[0])(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _any

    def log_message(self, *args: object) -> None:
        pass


class FlakyRegistry(ThreadingHTTPServer):
    """``routes``: "METHOD /path" → steps, each used once, the last one for good."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, list[Step]] = {}
        self.seen: list[tuple[str, str | None]] = []
        self.token_check: Callable[[BaseHTTPRequestHandler], Step | None] | None = None
        self.address = f"127.0.0.1:{self.server_address[1]}"

    def count(self, key: str) -> int:
        return sum(1 for seen, _ in self.seen if seen == key)


@pytest.fixture
def registry() -> Iterator[FlakyRegistry]:
    server = FlakyRegistry()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def _client(registry: FlakyRegistry, **kwargs: object) -> RemoteRegistryClient:
    return RemoteRegistryClient(registry.address, retry_wait=0.01, **kwargs)  # type: ignore[arg-type]


MANIFEST_OK = answer(200, MANIFEST, ("Content-Type", OCI_MANIFEST))


def test_a_manifest_read_survives_503s_and_a_dropped_connection(registry: FlakyRegistry) -> None:
    registry.routes["GET /v2/mms/base/manifests/1"] = [answer(503), drop, answer(502), MANIFEST_OK]
    with _client(registry) as client:
        manifest = client.get_manifest("mms/base", "1")
    assert manifest.body["config"]["digest"] == CONFIG_DIGEST
    assert registry.count("GET /v2/mms/base/manifests/1") == 4


def test_a_429_is_retried_after_its_retry_after(registry: FlakyRegistry) -> None:
    registry.routes["HEAD /v2/mms/base/blobs/" + BLOB_DIGEST] = [
        answer(429, b"", ("Retry-After", "1")),
        answer(200, BLOB),
    ]
    started = time.monotonic()
    with _client(registry) as client:
        assert client.blob_size("mms/base", BLOB_DIGEST) == len(BLOB)
    assert time.monotonic() - started >= 1.0


def test_attempts_are_bounded_and_a_client_error_is_not_retried(registry: FlakyRegistry) -> None:
    registry.routes["GET /v2/mms/base/manifests/1"] = [answer(500)]
    registry.routes["GET /v2/mms/base/manifests/2"] = [answer(403), MANIFEST_OK]
    with _client(registry, tries=3) as client:
        with pytest.raises(RemoteRegistryError) as failed:
            client.get_manifest("mms/base", "1")
        assert failed.value.status == 500
        assert registry.count("GET /v2/mms/base/manifests/1") == 3
        with pytest.raises(RemoteRegistryError) as denied:
            client.get_manifest("mms/base", "2")
        assert denied.value.status == 403
        assert registry.count("GET /v2/mms/base/manifests/2") == 1


def test_each_retry_is_told_and_the_listener_can_stop_the_retries(registry: FlakyRegistry) -> None:
    registry.routes["GET /v2/mms/base/manifests/1"] = [answer(503), drop, MANIFEST_OK]
    told: list[str] = []
    with _client(registry, on_retry=told.append) as client:
        client.get_manifest("mms/base", "1")
    assert len(told) == 2, told
    assert "answered 503" in told[0] and "attempt 2" in told[0], told
    assert "did not answer" in told[1] and "attempt 3" in told[1], told

    class Cancelled(Exception):
        pass

    def cancelled(text: str) -> None:  # a build's log writer, once the build was cancelled
        raise Cancelled(text)

    registry.routes["GET /v2/mms/base/manifests/2"] = [answer(502)]
    with _client(registry, tries=10, on_retry=cancelled) as client, pytest.raises(Cancelled):
        client.get_manifest("mms/base", "2")
    assert registry.count("GET /v2/mms/base/manifests/2") == 1


def test_a_retry_after_longer_than_the_time_budget_fails_at_once(registry: FlakyRegistry) -> None:
    registry.routes["GET /v2/mms/base/manifests/1"] = [answer(503, b"", ("Retry-After", "30")), MANIFEST_OK]
    started = time.monotonic()
    with _client(registry, retry_seconds=5) as client, pytest.raises(RemoteRegistryError):
        client.get_manifest("mms/base", "1")
    assert time.monotonic() - started < 5


def test_a_blob_cut_off_mid_download_is_downloaded_again(registry: FlakyRegistry, tmp_path) -> None:
    registry.routes["GET /v2/mms/base/blobs/" + BLOB_DIGEST] = [cut_off(BLOB), answer(200, BLOB)]
    with _client(registry) as client:
        assert client.download_blob("mms/base", BLOB_DIGEST, tmp_path / "blob") == len(BLOB)
    assert (tmp_path / "blob").read_bytes() == BLOB


def test_a_failed_upload_starts_again_and_a_streamed_patch_is_not_replayed(registry: FlakyRegistry) -> None:
    upload = ("Location", "/v2/acct/img/blobs/uploads/u1")
    registry.routes["POST /v2/acct/img/blobs/uploads/"] = [answer(202, b"", upload)]
    registry.routes["PUT /v2/acct/img/blobs/uploads/u1"] = [answer(500), answer(201)]
    with _client(registry) as client:
        how = client.push_blob("acct/img", BLOB_DIGEST, len(BLOB), lambda: iter([BLOB]))
        assert how == "uploaded"
        assert registry.count("POST /v2/acct/img/blobs/uploads/") == 2  # a new upload each time
        assert registry.count("PUT /v2/acct/img/blobs/uploads/u1") == 2

        registry.routes["PATCH /v2/acct/img/blobs/uploads/u1"] = [answer(503), answer(202, b"", upload)]
        with pytest.raises(RemoteRegistryError) as failed:
            client.upload_stream("acct/img", iter([BLOB]))
        assert failed.value.status == 503
        assert registry.count("PATCH /v2/acct/img/blobs/uploads/u1") == 1


def test_a_token_is_fetched_again_before_it_expires_so_a_slow_upload_keeps_going(registry: FlakyRegistry) -> None:
    """The token service gives 2-second tokens; the registry takes 2.1 s to start an upload.
    The PATCH that follows must carry a new token, not the one that has just expired."""
    lifetime = 2.0
    issued: dict[str, float] = {}

    def token(h: BaseHTTPRequestHandler) -> None:
        name = f"t{len(issued) + 1}"
        issued[name] = time.monotonic()
        answer(200, json.dumps({"token": name, "expires_in": int(lifetime)}).encode())(h)

    def check(h: BaseHTTPRequestHandler) -> Step | None:
        name = (h.headers.get("Authorization") or "").removeprefix("Bearer ")
        if name in issued and time.monotonic() - issued[name] < lifetime:
            return None
        challenge = (
            f'Bearer realm="http://{registry.address}/token",service="test",scope="repository:acct/img:pull,push"'
        )
        return answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', ("WWW-Authenticate", challenge))

    def slow_start(h: BaseHTTPRequestHandler) -> None:
        time.sleep(2.1)
        answer(202, b"", ("Location", "/v2/acct/img/blobs/uploads/u1"))(h)

    registry.token_check = check
    registry.routes["GET /token"] = [token]
    registry.routes["POST /v2/acct/img/blobs/uploads/"] = [slow_start]
    registry.routes["PATCH /v2/acct/img/blobs/uploads/u1"] = [
        answer(202, b"", ("Location", "/v2/acct/img/blobs/uploads/u1"))
    ]
    registry.routes["PUT /v2/acct/img/blobs/uploads/u1"] = [answer(201)]
    with _client(registry) as client:
        assert client.upload_stream("acct/img", iter([BLOB])) == (BLOB_DIGEST, len(BLOB))
    patches = [auth for key, auth in registry.seen if key.startswith("PATCH")]
    assert patches == ["Bearer t2"]


def test_a_new_layer_whose_streamed_upload_fails_is_made_and_sent_again(registry: FlakyRegistry) -> None:
    upload = ("Location", "/v2/acct/img/blobs/uploads/u1")
    registry.routes["POST /v2/acct/img/blobs/uploads/"] = [answer(202, b"", upload)]
    registry.routes["PATCH /v2/acct/img/blobs/uploads/u1"] = [answer(503), answer(202, b"", upload)]
    registry.routes["PUT /v2/acct/img/blobs/uploads/u1"] = [answer(201)]
    layer = LayerBuilder()
    layer.add_bytes("/var/azureml-app/score.py", b"def run(data):\n    return data\n")
    lines: list[str] = []
    with _client(registry) as client:
        blob = OciBuilder(registry.address)._new_layer(
            layer, "mms oci builder: driver", client, "acct/img", lines.append
        )
    assert blob.placed == "uploaded" and blob.diff_id == layer.diff_id()
    assert registry.count("PATCH /v2/acct/img/blobs/uploads/u1") == 2
    assert registry.count("POST /v2/acct/img/blobs/uploads/") == 2


@pytest.mark.parametrize("registry_clock", [-3600.0, 3600.0])
def test_a_token_lasts_its_lifetime_by_our_clock_whatever_the_registrys_says(
    registry: FlakyRegistry, registry_clock: float
) -> None:
    """The token service's clock is an hour behind (or ahead of) ours: its ``issued_at``
    must not make the token look expired (a new one for every request) or younger."""
    issued = datetime.fromtimestamp(time.time() + registry_clock, UTC).isoformat()
    tokens: list[str] = []

    def token(h: BaseHTTPRequestHandler) -> None:
        tokens.append(f"t{len(tokens) + 1}")
        answer(200, json.dumps({"token": tokens[-1], "expires_in": 300, "issued_at": issued}).encode())(h)

    def check(h: BaseHTTPRequestHandler) -> Step | None:
        if (h.headers.get("Authorization") or "").removeprefix("Bearer ") in tokens:
            return None
        challenge = f'Bearer realm="http://{registry.address}/token",service="test",scope="repository:mms/base:pull"'
        return answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', ("WWW-Authenticate", challenge))

    registry.token_check = check
    registry.routes["GET /token"] = [token]
    registry.routes["GET /v2/mms/base/manifests/1"] = [MANIFEST_OK]
    with _client(registry) as client:
        for _ in range(5):
            client.get_manifest("mms/base", "1")
    assert tokens == ["t1"]
    assert registry.count("GET /v2/mms/base/manifests/1") == 6  # the first one challenged


def test_a_registry_that_always_fails_gets_tries_requests_not_tries_squared(registry: FlakyRegistry, tmp_path) -> None:
    """Each operation retries at one layer: a blob read, a download, an upload, a copy from
    another registry and a streamed layer each give up after their documented few attempts."""
    blob = "GET /v2/mms/base/blobs/" + BLOB_DIGEST
    registry.routes[blob] = [answer(503)]
    registry.routes["POST /v2/acct/img/blobs/uploads/"] = [answer(503)]
    started = time.monotonic()
    with _client(registry, tries=4) as client:
        with pytest.raises(RemoteRegistryError):
            client.get_blob("mms/base", BLOB_DIGEST)
        assert registry.count(blob) == 4
        with pytest.raises(RemoteRegistryError):
            client.download_blob("mms/base", BLOB_DIGEST, tmp_path / "blob")
        assert registry.count(blob) == 8
        with pytest.raises(RemoteRegistryError):
            client.push_blob("acct/img", BLOB_DIGEST, len(BLOB), lambda: iter([BLOB]))
        assert registry.count("POST /v2/acct/img/blobs/uploads/") == 4

        # The docker builder's base copy: a push whose body is read from another registry.
        registry.routes["POST /v2/acct/img/blobs/uploads/"] = [
            answer(202, b"", ("Location", "/v2/acct/img/blobs/uploads/u1"))
        ]
        registry.routes["PUT /v2/acct/img/blobs/uploads/u1"] = [answer(201)]
        with pytest.raises(RemoteRegistryError), _client(registry, tries=4) as source:
            client.push_blob("acct/img", BLOB_DIGEST, len(BLOB), _blob_copier(source, "mms/base", BLOB_DIGEST))
        assert registry.count(blob) == 12

        # The oci builder's streamed layer: it makes the layer again, within the client's tries.
        registry.routes["POST /v2/acct/img/blobs/uploads/"] = [answer(503)]
        before = registry.count("POST /v2/acct/img/blobs/uploads/")
        layer = LayerBuilder()
        layer.add_bytes("/var/azureml-app/score.py", b"def run(data):\n    return data\n")
        with pytest.raises(RemoteRegistryError):
            OciBuilder(registry.address)._new_layer(
                layer, "mms oci builder: driver", client, "acct/img", lambda line: None
            )
        assert registry.count("POST /v2/acct/img/blobs/uploads/") - before == 4
    assert time.monotonic() - started < 30


def test_registry_retries_must_end_before_the_build_deadline() -> None:
    with pytest.raises(ValidationError, match="MMS_REGISTRY_RETRY_SECONDS"):
        Settings(registry_retry_seconds=600, build_run_deadline_seconds=600)
    assert Settings(registry_retry_seconds=599, build_run_deadline_seconds=600).registry_retry_seconds == 599
    assert Settings(build_run_deadline_seconds=120).registry_retry_seconds == 60  # the default, halved
