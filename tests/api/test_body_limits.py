"""Request bodies are decided on before they are read: a stranger's body is never read (401
at once), and a JSON body past MMS_MAX_JSON_BODY_BYTES is a 413, up front for a declared
length and as soon as a chunked one passes the limit; asset uploads keep their own limit."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.context import ServiceContext
from tests.api.test_manifests import seed_manifest
from tests.factories import model_body
from tests.live_server import Live, live_service

LIMIT = 1024**2  # the default MMS_MAX_JSON_BODY_BYTES
CHUNK = b"x" * 65536


@pytest.fixture()
def live(service_context: ServiceContext, tmp_path) -> Iterator[Live]:
    with live_service(service_context, tmp_path) as live:
        yield live


def _open(live: Live, path: str, headers: dict[str, str]) -> socket.socket:
    """A connection that has sent a POST's head (and no body yet)."""
    url = urlsplit(live.base + path if path.startswith("/") else path)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    lines = [
        f"POST {url.path} HTTP/1.1",
        f"Host: {url.netloc}",
        "Content-Type: application/json",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _answer(sock: socket.socket, timeout: float) -> tuple[int, dict]:
    """The status and JSON body of the response, which must come within ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without answering: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), json.loads(body)


def _models(live: Live) -> str:
    return urlsplit(live.account()).path + "/models"


def test_a_strangers_body_is_answered_401_without_being_read(live: Live) -> None:
    path = _models(live)
    for headers in (
        {"Content-Length": "300000000"},
        {"Transfer-Encoding": "chunked"},
        {"Content-Length": "300000000", "Authorization": "Bearer not-a-token"},
    ):
        sock = _open(live, path, headers)
        with sock:
            started = time.monotonic()
            # 64 KiB of the 300 MB: the rest never comes, so a server that read the body would never answer.
            sock.sendall(b"10000\r\n" + CHUNK + b"\r\n" if "Transfer-Encoding" in headers else CHUNK)
            status, body = _answer(sock, timeout=5)
        assert status == 401, body
        assert body["code"] == "Unauthorized" and body["statusCode"] == 401
        assert time.monotonic() - started < 2


def test_a_declared_length_past_the_limit_is_a_413_before_the_body_is_sent(live: Live) -> None:
    path = _models(live)
    sock = _open(live, path, {"Content-Length": str(LIMIT + 1), **live.headers})
    with sock:
        status, body = _answer(sock, timeout=5)  # no byte of the body was sent
    assert status == 413, body
    assert body["code"] == "PayloadTooLarge" and body["statusCode"] == 413
    assert f"limit of {LIMIT} bytes (MMS_MAX_JSON_BODY_BYTES)" in body["message"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(live: Live) -> None:
    path = _models(live)
    sock = _open(live, path, {"Transfer-Encoding": "chunked", **live.headers})
    sent = 0
    with sock:
        sock.sendall(b'10000\r\n{"name": "' + CHUNK[10:] + b"\r\n")
        sent += len(CHUNK)
        # Up to 64 MiB; the server answers once it has read a little past 1 MiB.
        while sent < 64 * LIMIT and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(b"10000\r\n" + CHUNK + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(CHUNK)
        status, body = _answer(sock, timeout=5)
    assert status == 413, body
    assert "MMS_MAX_JSON_BODY_BYTES" in body["message"]
    assert sent < 16 * LIMIT  # what the socket buffers took past the limit, not the whole body


def test_an_unread_body_is_never_consumed(client: TestClient, owner: dict[str, str], account: str) -> None:
    # The test client reads the request's body only when the app asks for it.
    taken = []

    def body() -> Iterator[bytes]:
        for _ in range(300 * 16):  # 300 MiB, if it were read
            taken.append(1)
            yield b" " * 65536

    response = client.post(f"{account}/models", content=body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 401 and taken == []
    response = client.post(
        f"{account}/models",
        content=body(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer x.y.z"},
    )
    assert response.status_code == 401 and taken == []


def test_legitimate_bodies_and_uploads_pass(client: TestClient, owner: dict[str, str], account: str) -> None:
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    # The largest manifest the schema allows has 100 assets with URLs of up to 4 KiB.
    url = "https://example.blob.core.windows.net/c/" + "a" * 4000
    assets = [{"id": f"asset{i}", "url": url, "mimeType": "application/octet-stream"} for i in range(100)]
    manifest = {**seed_manifest(model_id), "assets": assets, "driverProgram": "asset0"}
    assert LIMIT / 2 > len(json.dumps(manifest)) > 400_000
    response = client.post(f"{account}/manifests", json=manifest, headers=owner)
    assert response.status_code == 200, response.text[:500]
    # An asset upload streams to a file under MMS_ASSET_MAX_BYTES, not the JSON limit.
    upload = client.post(f"{account}/assets?name=big.bin", content=b"\0" * (2 * LIMIT), headers=owner)
    assert upload.status_code == 201, upload.text
    assert upload.json()["size"] == 2 * LIMIT


def test_a_token_form_past_the_limit_is_a_413(client: TestClient) -> None:
    response = client.post(
        "/oauth2/token",
        content=b"grant_type=client_credentials&x=" + b"a" * LIMIT,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "PayloadTooLarge"
