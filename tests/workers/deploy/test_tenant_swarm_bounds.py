"""A tenant's swarm engine that answers with more than any swarm would (a listing, a log, an
error, a compressed bomb) fails the pass promptly with the bound named, nothing of the answer
in the error, and the worker's memory far below the answer's size. A real TLS engine of our
own making on 127.0.0.1 (a test CA, a client certificate, a name the certificate holds)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import resource
import ssl
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

import docker
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.deployments.reconciler import Replica
from tests.listeners import tcp_listener
from tests.workers.deploy.specs import swarm_spec
from workers.builders import docker as docker_module
from workers.builders.docker import MAX_TENANT_ANSWER_BYTES
from workers.deploy.local import INSTALLATION_LABEL, LOG_LINES_PER_PASS, EngineUnreachable, pulled_image
from workers.deploy.swarm import SwarmDriver, _bounded

NAME = "engine.test"  # the manager's name, in its certificate; the connection goes to 127.0.0.1
HUGE = 128 * 1024 * 1024  # what the hostile engine sends: 16 times the bound
MARK = b"HOSTILE-BODY-"  # the answer's text, which no error may quote
CONTAINER = "c" * 64
# What reading up to the bound costs, with room to spare; far below HUGE.
MEMORY_ALLOWED = 4 * MAX_TENANT_ANSWER_BYTES


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, **kw
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0] if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if kw.get("san"):
        builder = builder.add_extension(x509.SubjectAlternativeName(kw["san"]), critical=False)
    if kw.get("usage"):
        builder = builder.add_extension(x509.ExtendedKeyUsage([kw["usage"]]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(path: Path, *objects: object) -> str:
    with path.open("wb") as file:
        for obj in objects:
            if isinstance(obj, x509.Certificate):
                file.write(obj.public_bytes(serialization.Encoding.PEM))
            else:
                file.write(
                    obj.private_bytes(  # type: ignore[attr-defined]
                        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                    )
                )
    return str(path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("engine-tls")
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("test engine CA", ca_key, None)
    issuer = (ca.subject, ca_key)
    server = _cert(
        NAME,
        server_key,
        issuer,
        san=[x509.DNSName(NAME), x509.IPAddress(ip_address("127.0.0.1"))],
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client = _cert("mms", client_key, issuer, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return {
        "ca": _pem(folder / "ca.pem", ca),
        "server": _pem(folder / "server.pem", server, server_key),
        "cert": _pem(folder / "cert.pem", client),
        "key": _pem(folder / "key.pem", client_key),
    }


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


# What the engine answers at each path (after /v1.41): a status, headers and a body (bytes, or
# an iterator of chunks sent chunked without a Content-Length).
Answer = tuple[int, dict[str, str], bytes | Iterator[bytes]]

SERVICE = {
    "ID": "s1",
    "Spec": {"Name": "x", "Labels": {"org.mms.generation": "1", INSTALLATION_LABEL: "test"}},
    "Version": {"Index": 1},
}
TASK = {
    "ID": "t1",
    "DesiredState": "running",
    "Status": {"State": "running", "ContainerStatus": {"ContainerID": CONTAINER}},
}


def _normal(path: str) -> Answer | None:
    if path == "/version":
        return 200, {}, _json({"ApiVersion": "1.41", "Version": "24.0.0"})
    if path == "/info":
        return 200, {}, _json({"Swarm": {"NodeID": "n1", "LocalNodeState": "active", "ControlAvailable": True}})
    if path == "/services":
        return 200, {}, _json([SERVICE])
    if path == "/tasks":
        return 200, {}, _json([TASK])
    if path == f"/containers/{CONTAINER}/json":
        return 200, {}, _json({"Id": CONTAINER, "Config": {"Tty": True}})
    return None


def _huge_chunks() -> Iterator[bytes]:
    piece = MARK * (64 * 1024 // len(MARK))
    for _ in range(HUGE // len(piece)):
        yield piece


def _huge_json() -> Iterator[bytes]:
    """A JSON list of one string of ``HUGE`` bytes, made as it is sent (not held whole here)."""
    yield b'["'
    yield from _huge_chunks()
    yield b'"]'


def _gzipped_huge_json() -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip's framing
    return b"".join([*(packer.compress(chunk) for chunk in _huge_json()), packer.flush()])


class _Engine(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hostile: Callable[[str], Answer | None] = staticmethod(lambda path: None)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path.removeprefix("/v1.41")
        status, headers, body = type(self).hostile(path) or _normal(path) or (404, {}, _json({"message": "no"}))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        try:
            if isinstance(body, bytes):
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif "Content-Length" in headers:  # its length told, then sent as it comes
                self.end_headers()
                for chunk in body:
                    self.wfile.write(chunk)
            else:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in body:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, ssl.SSLError):  # the worker hung up: the bound held
            self.close_connection = True

    do_POST = do_GET

    def log_message(self, *_: object) -> None:
        return None


@pytest.fixture()
def engine(certs: dict[str, str]) -> Iterator[tuple[int, type[_Engine]]]:
    handler = type("Engine", (_Engine,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server"])
    context.load_verify_locations(certs["ca"])
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _driver(port: int, certs: dict[str, str]) -> SwarmDriver:
    tls = docker.tls.TLSConfig(client_cert=(certs["cert"], certs["key"]), ca_cert=certs["ca"], verify=True)
    return SwarmDriver(
        f"tcp://127.0.0.1:{port}",
        installation="test",
        subnet_pool="10.99.0.0/16",
        tmp_mb=64,
        pids=64,
        tls=tls,
        published_host="127.0.0.1",
        server_hostname=NAME,
    )


def _observe(driver: SwarmDriver) -> None:
    driver.observe(swarm_spec())


def _read_logs(driver: SwarmDriver) -> None:
    spec = swarm_spec()
    replicas, _ = driver.observe(spec)
    driver.read_logs(spec, replicas)


def _fails_bounded(call: Callable[[], object]) -> str:
    """``call``'s EngineUnreachable, checked to come promptly and to cost far less memory than
    the answer; its message."""
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(EngineUnreachable) as raised:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 20
    assert peak < MEMORY_ALLOWED, f"{peak} bytes allocated reading a hostile answer"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert grown < MEMORY_ALLOWED, f"the worker's peak memory grew by {grown} bytes"
    message = str(raised.value)
    assert MARK.decode() not in message and "HOSTILE" not in message
    assert len(message) < 200
    return message


def _as_sent(kind: str) -> Answer:
    if kind == "length":  # told truly, up front
        return 200, {"Content-Length": str(HUGE + 4)}, _huge_json()
    if kind == "chunked":
        return 200, {}, _huge_json()
    if kind == "gzip":  # 128 MiB of JSON in a few hundred KiB: requests unpacks what it reads
        return 200, {"Content-Encoding": "gzip"}, _gzipped_huge_json()
    if kind == "error":  # an error's message goes into the error: far less of it is read
        return 500, {}, itertools.chain([b'{"message": "'], _huge_chunks(), [b'"}'])
    # A Content-Length past the bound, then the body slowly: refused on the header, unread.
    return 200, {"Content-Length": str(HUGE)}, iter([_json([SERVICE])])


@pytest.mark.parametrize("kind", ["length", "chunked", "gzip", "error", "declared"])
def test_a_huge_listing_fails_the_pass_naming_the_bound(
    engine: tuple[int, type[_Engine]], certs: dict[str, str], kind: str
) -> None:
    port, handler = engine
    answer = _as_sent(kind)
    handler.hostile = staticmethod(lambda path: answer if path == "/services" else None)
    with _driver(port, certs) as driver:
        message = _fails_bounded(lambda: _observe(driver))
    assert "the swarm's engine answered more than" in message
    assert str(MAX_TENANT_ANSWER_BYTES if kind != "error" else 64 * 1024) in message


def test_a_huge_task_listing_or_log_fails_the_pass_naming_the_bound(
    engine: tuple[int, type[_Engine]], certs: dict[str, str]
) -> None:
    port, handler = engine
    handler.hostile = staticmethod(lambda path: _as_sent("chunked") if path == "/tasks" else None)
    with _driver(port, certs) as driver:
        assert str(MAX_TENANT_ANSWER_BYTES) in _fails_bounded(lambda: _observe(driver))
    logs = f"/containers/{CONTAINER}/logs"
    handler.hostile = staticmethod(lambda path: (200, {}, _huge_chunks()) if path == logs else None)
    with _driver(port, certs) as driver:
        assert str(MAX_TENANT_ANSWER_BYTES) in _fails_bounded(lambda: _read_logs(driver))


def test_a_huge_version_or_info_fails_the_connection_naming_the_bound(
    engine: tuple[int, type[_Engine]], certs: dict[str, str]
) -> None:
    port, handler = engine
    for where in ("/version", "/info"):
        handler.hostile = staticmethod(lambda path, where=where: _as_sent("chunked") if path == where else None)
        assert str(MAX_TENANT_ANSWER_BYTES) in _fails_bounded(lambda: _driver(port, certs))


def test_a_log_of_more_lines_than_asked_for_adds_no_more_than_a_pass_copies(
    engine: tuple[int, type[_Engine]], certs: dict[str, str]
) -> None:
    port, handler = engine
    count = 50 * LOG_LINES_PER_PASS  # the engine ignores ``tail``
    body = b"".join(b"2026-12-03T02:10:00.%09dZ line %d\n" % (n + 1, n) for n in range(count))
    logs = f"/containers/{CONTAINER}/logs"
    handler.hostile = staticmethod(lambda path: (200, {}, body) if path == logs else None)
    replica = Replica(id="t1", generation=1, image_id=None, address=None, alive=True, ready=False)
    with _driver(port, certs) as driver:
        driver._task_container["t1"] = CONTAINER
        lines = driver.read_logs(swarm_spec(), [replica])
    assert len(lines) == LOG_LINES_PER_PASS
    assert lines[-1].text == f"line {count - 1}"


@pytest.mark.parametrize("path", ["/version", "/services"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_redirect_is_never_followed(
    engine: tuple[int, type[_Engine]], certs: dict[str, str], path: str, scheme: str
) -> None:
    """A tenant's engine that redirects the worker elsewhere (here a listener on the host's
    loopback, standing in for a metadata address or a service bound there) is not followed."""
    port, handler = engine
    with tcp_listener() as (elsewhere, peers):
        answer: Answer = (307, {"Location": f"{scheme}://127.0.0.1:{elsewhere}/v1.41{path}"}, b"")
        handler.hostile = staticmethod(lambda asked: answer if asked == path else None)

        def connect_and_observe() -> None:
            with _driver(port, certs) as driver:
                _observe(driver)

        message = _fails_bounded(connect_and_observe)
        time.sleep(0.3)  # the listener's accept loop polls every 0.2 s
        assert peers == [], "the worker followed the engine's redirect"
    assert "redirect (307), which is not followed" in message


NO_IMAGE: Answer = (404, {}, _json({"message": "No such image: registry.example.com/mms/a/b"}))


def _pull(driver: SwarmDriver) -> str:
    return pulled_image(driver._api, swarm_spec(), None)


def _progress(pause: float = 0.0, trickle_seconds: float = 0.0) -> Iterator[bytes]:
    """A pull's progress, chunked as an engine sends it, then a line every ``pause`` for
    ``trickle_seconds`` (far past the bound the test sets, and yet finite: the test ends even
    when the bound is broken)."""
    yield _json({"status": "Pulling from mms/a/b", "id": "1"}) + b"\r\n"
    until = time.monotonic() + trickle_seconds
    while time.monotonic() < until:
        time.sleep(pause)
        yield _json({"status": "Downloading", "id": "1"}) + b"\r\n"
    yield _json({"status": "Digest: sha256:" + "0" * 64}) + b"\r\n"


def _pulling(answer: Answer) -> Callable[[str], Answer | None]:
    def hostile(path: str) -> Answer | None:
        if path.startswith("/images/") and path.endswith("/json"):
            return NO_IMAGE
        return answer if path == "/images/create" else None

    return hostile


def test_a_pull_streams_its_progress_through_the_bound(
    engine: tuple[int, type[_Engine]], certs: dict[str, str]
) -> None:
    port, handler = engine
    handler.hostile = staticmethod(_pulling((200, {}, _progress())))
    with _driver(port, certs) as driver:
        assert _pull(driver).startswith("registry.example.com/mms/a/b@sha256:")


@pytest.mark.parametrize("how", ["silent", "trickling"])
def test_a_pull_that_never_ends_fails_in_bounded_time(
    engine: tuple[int, type[_Engine]], certs: dict[str, str], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker-py pulls with no timeout at all: a tenant's engine that never answers, or never
    finishes, would hold a deploy thread (every tenant's) for ever."""
    monkeypatch.setattr(docker_module, "TENANT_READ_SECONDS", 1.0)
    monkeypatch.setattr(docker_module, "MAX_TENANT_ANSWER_SECONDS", 2.0)
    port, handler = engine
    if how == "silent":
        answer: Answer = (200, {}, iter([b""]))
        handler.hostile = staticmethod(
            lambda path: (time.sleep(30), answer)[1] if path == "/images/create" else _pulling(answer)(path)
        )
    else:
        handler.hostile = staticmethod(_pulling((200, {}, _progress(pause=0.2, trickle_seconds=20))))
    with _driver(port, certs) as driver:
        started = time.monotonic()
        with pytest.raises(EngineUnreachable) as raised:
            _bounded(_pull)(driver)
        assert time.monotonic() - started < 10
    assert "did not answer" in str(raised.value) or "did not finish an answer within 2 s" in str(raised.value)
