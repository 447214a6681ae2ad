"""Servers a test runs to see whether anything reached it: a TCP one and an HTTP one; an
HTTP server that fails a few times before it answers; one whose answers never end; a proxy
that loses an answer."""

from __future__ import annotations

import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx


@contextmanager
def _serving(server: ThreadingHTTPServer) -> Iterator[None]:
    """``server`` answering on a thread of its own until the block ends, then closed."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def tcp_listener(greeting: bytes = b"") -> Iterator[tuple[int, list[tuple[str, int]]]]:
    """A TCP server on 0.0.0.0 (every address of the host); yields its port and the peers
    that connected (each is sent ``greeting``, then closed)."""
    peers: list[tuple[str, int]] = []
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connection, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peers.append(peer)
            with connection:
                if greeting:
                    connection.sendall(greeting)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], peers
    finally:
        stop.set()
        thread.join(5)
        server.close()


class _Recorder(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def recording_http_server() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on a loopback port that answers 404 and records every path asked
    (``.seen``); ``.address`` is its host:port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    server.address = f"127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    with _serving(server):
        yield server


class _Flaky(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        server = self.server
        server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(server.delay)  # type: ignore[attr-defined]
        failures = server.failures  # type: ignore[attr-defined]
        if failures:
            failure = failures.pop(0)
            if failure == "drop":  # hang up without an answer
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status, headers = failure
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(server.body)))  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(server.body)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def flaky_http_server(body: bytes, failures: list, *, delay: float = 0.0) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on a loopback port that answers with ``failures`` first, one per
    request ("drop", or (status, headers)), then 200 with ``body``, each after ``delay``
    seconds; ``.seen`` records (method, path), ``.url`` is its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.daemon_threads = True
    server.seen, server.failures, server.body = [], list(failures), body  # type: ignore[attr-defined]
    server.delay = delay  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    with _serving(server):
        yield server


class _Endless(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server = self.server
        server.seen.append(self.path)  # type: ignore[attr-defined]
        if server.answer_first is not None and server.answer_first(self):  # type: ignore[attr-defined]
            return
        self.send_response(server.status)  # type: ignore[attr-defined]
        self.send_header("Content-Type", server.content_type)  # type: ignore[attr-defined]
        self.send_header("Transfer-Encoding", "chunked")  # no length to refuse up front
        self.end_headers()
        chunk = b"{" * server.chunk_size  # type: ignore[attr-defined]
        try:
            while server.sent < server.gives_up_after:  # type: ignore[attr-defined]
                time.sleep(server.chunk_delay)  # type: ignore[attr-defined]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                server.sent += len(chunk)  # type: ignore[attr-defined]
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up
            server.hung_up.set()  # type: ignore[attr-defined]
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def endless_http_server(
    *,
    status: int = 200,
    content_type: str = "application/json",
    answer_first=None,  # type: ignore[no-untyped-def]
    gives_up_after: int = 512 << 20,
    chunk_size: int = 64 << 10,
    chunk_delay: float = 0.0,
) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on a loopback port whose GETs answer ``status`` with a chunked body of
    ``{`` that goes on until the client hangs up (``.hung_up`` is set then) or, so that a test
    of a reader without a cap ends, ``gives_up_after`` bytes. ``.sent`` counts the bytes
    sent, ``.seen`` the paths asked, ``.url`` and ``.address`` say where it is.
    ``answer_first(handler)``: answers a request itself when it returns True. Chunks of
    ``chunk_size`` bytes, each after ``chunk_delay`` seconds (a trickle)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    server.status, server.content_type = status, content_type  # type: ignore[attr-defined]
    server.answer_first, server.gives_up_after = answer_first, gives_up_after  # type: ignore[attr-defined]
    server.chunk_size, server.chunk_delay = chunk_size, chunk_delay  # type: ignore[attr-defined]
    server.sent, server.seen, server.hung_up = 0, [], threading.Event()  # type: ignore[attr-defined]
    server.address = f"127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    server.url = f"http://{server.address}"  # type: ignore[attr-defined]
    with _serving(server):
        yield server


def bounded_read(call: Callable[[], object]) -> tuple[Exception, float, int]:
    """Run ``call``, which must fail; the error, the seconds it took and its peak memory."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the error is what is measured
        return exc, time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    raise AssertionError("the call did not fail")


class _AnswerLosing(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        server = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
        answer = httpx.request(self.command, server.target + self.path, headers=headers, content=body, timeout=30)  # type: ignore[attr-defined]
        server.seen.append((self.command, self.path, self.headers.get("Idempotency-Key")))  # type: ignore[attr-defined]
        if server.lose(self.command, self.path):  # type: ignore[attr-defined]
            server.lose = lambda method, path: False  # type: ignore[attr-defined]
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(answer.status_code)
        for key, value in answer.headers.items():
            if key.lower() not in ("content-length", "connection", "transfer-encoding", "content-encoding"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def answer_losing_proxy(target: str, lose: Callable[[str, str], bool]) -> Iterator[ThreadingHTTPServer]:
    """A proxy to ``target`` that hangs up instead of relaying the first answer ``lose(method,
    path)`` picks, once the target has acted on the request: a connection cut on the way back."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AnswerLosing)
    server.daemon_threads = True
    server.target, server.lose, server.seen = target, lose, []  # type: ignore[attr-defined]
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    with _serving(server):
        yield server
