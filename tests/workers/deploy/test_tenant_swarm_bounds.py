"""A tenant's swarm engine that answers with more than any swarm would (a listing, a log, an
error, a compressed bomb) fails the pass promptly with the bound named, nothing of the answer
in the error, and the worker's memory far below the answer's size. A real TLS engine of our
own making on 127.0.0.1 (a test CA, a client certificate, a name the certificate holds)."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import resource
import socket
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
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # a POST's body: the next request follows it
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

    do_POST = do_DELETE = do_GET

    def log_message(self, *_: object) -> None:
        return None


@contextlib.contextmanager
def serving_tls(
    handler: type[BaseHTTPRequestHandler],
    certs: dict[str, str],
    *,
    client_certificate: bool = True,
    also_trusted: str | None = None,
) -> Iterator[int]:
    """``handler`` served over TLS on 127.0.0.1 with the engine's certificate, requiring a client
    certificate from the CA (or ``also_trusted``'s, PEM) unless told not to; its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server"])
    context.load_verify_locations(certs["ca"])
    if also_trusted:
        context.load_verify_locations(cadata=also_trusted)
    context.verify_mode = ssl.CERT_REQUIRED if client_certificate else ssl.CERT_NONE
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture()
def engine(certs: dict[str, str]) -> Iterator[tuple[int, type[_Engine]]]:
    handler = type("Engine", (_Engine,), {})
    with serving_tls(handler, certs) as port:
        yield port, handler


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


@pytest.mark.parametrize("info", [[1, 2], {"Swarm": "active"}, "swarm"])
def test_an_info_that_is_no_object_is_no_manager_and_leaves_no_deadline_timer(
    engine: tuple[int, type[_Engine]], certs: dict[str, str], info: object
) -> None:
    """A tenant's engine answering /info with a list or a string: the driver refuses it as no
    swarm manager, and its client (the deadline's timer thread, the connection) is closed."""
    port, handler = engine
    handler.hostile = staticmethod(lambda path: (200, {}, _json(info)) if path == "/info" else None)
    timers = {thread for thread in threading.enumerate() if isinstance(thread, threading.Timer)}
    with pytest.raises(EngineUnreachable) as raised:
        _driver(port, certs)
    assert "not a swarm manager" in str(raised.value)
    left = {thread for thread in threading.enumerate() if isinstance(thread, threading.Timer)} - timers
    assert not [thread for thread in left if thread.is_alive() and not thread.finished.is_set()]


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


# What a pass acts on is bounded by the spec, not by what the engine lists (a listing of 8 MiB
# holds some 39,500 tasks), and every pass and cleanup ends by its deadline.

MANY_SERVICES = 2000
MANY_TASKS = 5000
CALLS_ANSWERED = 100  # of each kind: past it the engine fails the call, so an unbounded pass ends fast


def _many(probe_port: int, task_count: int = MANY_TASKS) -> tuple[Callable[[str], Answer | None], dict[str, int]]:
    """An engine that lists MANY_SERVICES swarm services of the service (each of a generation
    of its own) and MANY_TASKS running tasks of each, every one publishing ``probe_port``; and
    the count of the calls it was asked, by kind."""
    services = [
        {
            "ID": f"s{n}",
            "Spec": {
                "Name": f"x{n}",
                "Labels": {"org.mms.generation": str(n), INSTALLATION_LABEL: "test"},
                "Mode": {"Replicated": {"Replicas": MANY_TASKS}},
            },
            "Version": {"Index": 1},
        }
        for n in range(1, MANY_SERVICES + 1)
    ]
    port = {"Protocol": "tcp", "TargetPort": 5001, "PublishedPort": probe_port, "PublishMode": "host"}
    tasks = [
        {
            "ID": f"t{n}",
            "ServiceID": "s1",
            "DesiredState": "running",
            "CreatedAt": "2026-12-03T02:10:00.000000001Z",
            "Status": {
                "State": "running",
                "ContainerStatus": {"ContainerID": CONTAINER},
                "PortStatus": {"Ports": [port]},
            },
        }
        for n in range(task_count)
    ]
    listed, listed_tasks = _json(services), _json(tasks)
    calls: dict[str, int] = {}

    def hostile(path: str) -> Answer | None:
        parts = path.strip("/").split("/")
        # /services, /tasks: the listings; service, task: one's (inspected or deleted); update: a scale.
        kind = path if len(parts) == 1 else {2: parts[0][:-1], 3: parts[-1]}.get(len(parts), path)
        calls[kind] = calls.get(kind, 0) + 1
        if calls[kind] > CALLS_ANSWERED:
            return 500, {}, _json({"message": "asked too often"})
        if path == "/services":
            return 200, {}, listed
        if path == "/tasks":
            return 200, {}, listed_tasks
        if path.startswith("/tasks/"):
            return 200, {}, _json(tasks[0])
        if path.startswith("/services/") and path.endswith("/update"):
            return 200, {}, _json({})
        if path.startswith("/services/"):
            return 200, {}, _json(services[0])
        return None

    return hostile, calls


@pytest.mark.parametrize("replicas", [1, 5])
def test_a_pass_over_an_engine_listing_thousands_acts_on_what_the_spec_asks(
    engine: tuple[int, type[_Engine]], certs: dict[str, str], replicas: int
) -> None:
    from dataclasses import replace

    from workers.deploy.swarm import MAX_FAILED_TASKS, MAX_OTHER_GENERATIONS

    port, handler = engine
    with tcp_listener(b"HTTP/1.1 200 OK\r\n\r\n") as (probe_port, probes):
        hostile, calls = _many(probe_port)
        handler.hostile = staticmethod(hostile)
        spec = replace(swarm_spec(), replicas=replicas)
        started = time.monotonic()
        with _driver(port, certs) as driver:
            seen, _ = driver.observe(spec)
            driver.remove([r.id for r in seen])  # as a delete or a failure would
        took = time.monotonic() - started
    keep = replicas + MAX_FAILED_TASKS
    assert took < 5, f"a pass took {took:.1f} s"
    assert len(probes) <= keep  # the desired generation's tasks only
    assert calls["/tasks"] == 1 + MAX_OTHER_GENERATIONS  # the desired generation's, the newest others'
    assert len(seen) <= keep * (1 + MAX_OTHER_GENERATIONS)
    assert {r.generation for r in seen} == {1, MANY_SERVICES, MANY_SERVICES - 1}
    assert "task" not in calls  # the tasks it observed are not asked about again
    assert calls["service"] <= 1 + MAX_OTHER_GENERATIONS and calls["update"] <= 1 + MAX_OTHER_GENERATIONS


def test_remove_and_remove_all_act_on_a_bounded_number_a_call(
    engine: tuple[int, type[_Engine]], certs: dict[str, str]
) -> None:
    from workers.deploy.swarm import MAX_REMOVED_SERVICES, MAX_REMOVED_TASKS

    port, handler = engine
    hostile, calls = _many(1)
    handler.hostile = staticmethod(hostile)
    started = time.monotonic()
    with _driver(port, certs) as driver:
        driver.remove([f"t{n}" for n in range(MANY_TASKS)])  # none observed: each asked about
        assert calls["task"] == MAX_REMOVED_TASKS
        assert (calls["service"], calls["update"]) == (1, 1)  # all of one generation: one scale
        assert driver.remove_all(swarm_spec().id) is False  # more than it removes in one call: the next goes on
    assert time.monotonic() - started < 10  # some 70 calls; thousands without the bounds
    assert calls["service"] == 1 + MAX_REMOVED_SERVICES  # the DELETEs


def test_a_failed_services_generations_go_a_bounded_number_a_call_and_its_networks_stay(
    engine: tuple[int, type[_Engine]], certs: dict[str, str]
) -> None:
    from workers.deploy.swarm import MAX_REMOVED_SERVICES

    port, handler = engine
    hostile, calls = _many(1)
    handler.hostile = staticmethod(hostile)
    with _driver(port, certs) as driver:
        assert driver.remove_generations(swarm_spec().id) is False  # more than one call removes
    assert calls["service"] == MAX_REMOVED_SERVICES  # the DELETEs
    assert not any(kind.startswith("/networks") or kind == "network" for kind in calls)


@pytest.mark.parametrize("how", ["trickling", "slow-probes"])
def test_a_pass_ends_at_its_deadline_naming_it(
    engine: tuple[int, type[_Engine]], certs: dict[str, str], how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine that answers a listing a byte at a time (never silent long enough for a read
    timeout), or tasks whose probes each take their whole second: the pass ends at its
    deadline, the service's error naming it."""
    from dataclasses import replace

    from workers.deploy import swarm

    monkeypatch.setattr(swarm, "PASS_SECONDS", 2.0)
    port, handler = engine

    def trickle() -> Iterator[bytes]:
        until = time.monotonic() + 30  # far past the deadline, and yet finite
        while time.monotonic() < until:
            time.sleep(0.2)
            yield b" "
        yield _json([TASK])

    # A replica port that takes connections (the kernel's backlog) and answers nothing: each
    # probe takes its whole second.
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:
        if how == "trickling":
            handler.hostile = staticmethod(lambda path: (200, {}, trickle()) if path == "/tasks" else None)
        else:
            hostile, _ = _many(silent.getsockname()[1], task_count=30)
            handler.hostile = staticmethod(lambda path: None if path == "/services" else hostile(path))
        started = time.monotonic()
        with _driver(port, certs) as driver, pytest.raises(EngineUnreachable) as raised:
            driver.observe(replace(swarm_spec(), replicas=20))
        took = time.monotonic() - started
    assert took < 5, f"the pass took {took:.1f} s"
    assert "did not finish within 2 s" in str(raised.value)
    assert len(str(raised.value)) < 200


def test_a_cleanup_sweep_tries_no_row_past_its_time(
    app_context: object, db: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows not reached within a sweep's time stay due, untried, for the next sweep."""
    import uuid

    from sqlalchemy import select

    from app.orm import ClusterCleanup
    from workers.deploy import cluster_cleanup

    rows = [
        ClusterCleanup(
            service_id=uuid.uuid4(),
            compute_type="swarm",
            namespace="",
            docker_host="tcp://engine.test:2376",
            sealed_credentials="not sealed",  # a try fails at once: the credentials cannot be read
            attempts=0,
        )
        for _ in range(3)
    ]
    db.add_all(rows)  # type: ignore[attr-defined]
    db.flush()  # type: ignore[attr-defined]
    mine = [r.id for r in rows]

    def attempts() -> list[int]:
        query = select(ClusterCleanup.attempts).where(ClusterCleanup.id.in_(mine))
        return sorted(db.scalars(query.execution_options(populate_existing=True)))  # type: ignore[attr-defined]

    monkeypatch.setattr(cluster_cleanup, "SWEEP_SECONDS", 0.0)
    assert cluster_cleanup.clean_up_clusters(app_context, installation="test") == []  # type: ignore[arg-type]
    assert attempts() == [0, 0, 0]
    monkeypatch.setattr(cluster_cleanup, "SWEEP_SECONDS", 60.0)
    assert cluster_cleanup.clean_up_clusters(app_context, installation="test") == []  # type: ignore[arg-type]
    assert attempts() == [1, 1, 1]
