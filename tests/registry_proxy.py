"""A counting reverse proxy in front of a Docker registry, to measure what builders push.

    with CountingProxy("127.0.0.1:5000") as proxy:
        builder = DockerBuilder(docker_host, proxy.address)   # push through the proxy
        ...
        stats = proxy.stats()   # blob_uploads, upload_bytes, mounts, manifest_puts, requests
        proxy.reset()

Threaded HTTP/1.1 (stdlib ``http.server`` + ``http.client``) on 127.0.0.1 and a free port.
Every request is forwarded to the upstream registry on a fresh upstream connection, bodies
streamed both ways in 1 MiB pieces (never held whole): a client's chunked request body is
re-chunked upstream, an upstream body of unknown length is chunked to the client. Upload
URLs in ``Location`` headers are rewritten to point back at the proxy. The Docker engine
treats 127.0.0.0/8 registries as insecure (plain HTTP), so ``docker push
127.0.0.1:<port>/x:y`` goes through it with no daemon configuration.

What is counted (the registry's side of a push)::

    blob_uploads    uploads completed: PUT .../blobs/uploads/<id>?digest=… answered 201, or a
                    single-request POST .../blobs/uploads/?digest=… answered 201
    upload_bytes    request body bytes of blob uploads (PATCH, PUT, POST to .../blobs/uploads/),
                    whatever the answer
    mounts          cross-repository mounts: POST .../blobs/uploads/?mount=… answered 201
    manifest_puts   PUT .../manifests/<reference> answered 2xx
    downloaded_bytes  response body bytes of GETs (pulls)
    requests        (method, path, status, request_bytes) per request, in order, path without
                    its query string
"""

from __future__ import annotations

import http.client
import http.server
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Self
from urllib.parse import parse_qs, urlsplit

__all__ = ["CountingProxy", "ProxyStats", "Request"]

PIECE = 1 << 20  # bytes read and forwarded at a time
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_UPLOAD = re.compile(r"^/v2/.+/blobs/uploads/[^/]*$")
_MANIFEST = re.compile(r"^/v2/.+/manifests/[^/]+$")


class Request(NamedTuple):
    method: str
    path: str  # without the query string
    status: int  # 502 when the upstream could not be reached
    request_bytes: int


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of what went through the proxy since it started or was last reset."""

    blob_uploads: int = 0
    upload_bytes: int = 0
    mounts: int = 0
    manifest_puts: int = 0
    downloaded_bytes: int = 0
    requests: tuple[Request, ...] = field(default_factory=tuple)


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        self.blob_uploads = self.upload_bytes = self.mounts = self.manifest_puts = 0
        self.downloaded_bytes = 0
        self.requests: list[Request] = []

    def record(self, method: str, target: str, status: int, sent: int) -> None:
        parts = urlsplit(target)
        path, query = parts.path, parse_qs(parts.query)
        upload = bool(_UPLOAD.match(path))
        with self.lock:
            self.requests.append(Request(method, path, status, sent))
            if upload and method in ("PUT", "PATCH", "POST"):
                self.upload_bytes += sent
            if upload and status == 201 and "digest" in query and method in ("PUT", "POST"):
                self.blob_uploads += 1
            if upload and method == "POST" and status == 201 and "mount" in query:
                self.mounts += 1
            if method == "PUT" and 200 <= status < 300 and _MANIFEST.match(path):
                self.manifest_puts += 1

    def add_downloaded(self, size: int) -> None:
        with self.lock:
            self.downloaded_bytes += size

    def snapshot(self) -> ProxyStats:
        with self.lock:
            return ProxyStats(
                self.blob_uploads,
                self.upload_bytes,
                self.mounts,
                self.manifest_puts,
                self.downloaded_bytes,
                tuple(self.requests),
            )


class _BadRequest(Exception):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 300  # an idle client connection is closed after this long

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the counters are the record

    def _forward(self) -> None:
        # Each request is recorded before its answer goes out, so a client that has its
        # answer already sees it counted (downloaded bytes before each piece is written).
        server = self.server
        method, target = self.command, self.path
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = None if chunked else int(self.headers.get("Content-Length") or 0)
        upstream = http.client.HTTPConnection(
            server.upstream_host, server.upstream_port, timeout=server.upstream_timeout
        )
        sent = 0
        if server.before is not None:
            server.before(method, target)
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "host":
                    upstream.putheader(name, value)
            upstream.putheader("Host", server.upstream)
            if chunked:
                upstream.putheader("Transfer-Encoding", "chunked")
            upstream.endheaders()
            sent = self._copy_chunked(upstream) if chunked else self._copy_body(upstream, length)
            response = upstream.getresponse()
        except _BadRequest as exc:
            upstream.close()
            server.counters.record(method, target, 400, sent)
            self.close_connection = True
            self.send_error(400, str(exc))
            return
        except (OSError, http.client.HTTPException) as exc:
            upstream.close()
            server.counters.record(method, target, 502, sent)
            self.close_connection = True
            self._answer_bad_gateway(exc)
            return
        try:
            server.counters.record(method, target, response.status, sent)
            if server.after is not None:
                server.after(method, target, response.status)
            self._relay_response(response, method)
        finally:
            upstream.close()

    def _copy_body(self, upstream: http.client.HTTPConnection, length: int) -> int:
        left = length
        while left > 0:
            piece = self.rfile.read(min(PIECE, left))
            if not piece:
                raise _BadRequest("the request body ended early")
            upstream.send(piece)
            left -= len(piece)
        return length

    def _copy_chunked(self, upstream: http.client.HTTPConnection) -> int:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _BadRequest("bad chunk size line")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequest("bad chunk size") from None
            if size == 0:
                while self.rfile.readline(8192).strip():  # trailers: dropped
                    pass
                upstream.send(b"0\r\n\r\n")
                return total
            upstream.send(b"%x\r\n" % size)
            left = size
            while left > 0:
                piece = self.rfile.read(min(PIECE, left))
                if not piece:
                    raise _BadRequest("the request body ended early")
                upstream.send(piece)
                left -= len(piece)
            upstream.send(b"\r\n")
            total += size
            if self.rfile.read(2) != b"\r\n":
                raise _BadRequest("a chunk does not end with CRLF")

    def _relay_response(self, response: http.client.HTTPResponse, method: str) -> None:
        self.send_response_only(response.status, response.reason)
        declared = response.getheader("Content-Length")
        bodiless = method == "HEAD" or response.status in (204, 304) or response.status < 200
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in HOP_BY_HOP:
                continue
            if lower == "location":
                value = self._rewrite_location(value)
            self.send_header(name, value)
        relay_chunked = not bodiless and declared is None
        if relay_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if bodiless:
            response.read()
            return
        while True:
            piece = response.read(PIECE)
            if not piece:
                break
            if method == "GET":
                self.server.counters.add_downloaded(len(piece))
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if relay_chunked else piece)
        if relay_chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _rewrite_location(self, value: str) -> str:
        server = self.server
        for prefix in (f"http://{server.upstream}", f"https://{server.upstream}"):
            if value.startswith(prefix):
                return f"http://{server.address}{value[len(prefix) :]}"
        return value  # relative, or elsewhere: left alone

    def _answer_bad_gateway(self, exc: BaseException) -> None:
        body = f"proxy: upstream {self.server.upstream} failed: {exc}\n".encode()
        try:
            self.send_response_only(502, "Bad Gateway")
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client is gone too


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, upstream_timeout: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        host, _, port = upstream.rpartition(":")
        self.upstream_host, self.upstream_port = host, int(port)
        self.upstream_timeout = upstream_timeout
        self.address = f"127.0.0.1:{self.server_address[1]}"
        self.counters = _Counters()
        self.before: Callable[[str, str], None] | None = None
        self.after: Callable[[str, str, int], None] | None = None


class CountingProxy:
    """A reverse proxy to the registry at ``upstream`` ("host:port", plain HTTP) that counts.

    ``upstream_timeout`` bounds every read from and write to the upstream registry.
    ``before(method, target)`` is called in the request's thread before it goes upstream, and
    ``after(method, target, status)`` once the upstream answered, before the client has the
    answer: either may block, to hold a client at a chosen request (fault tests).
    """

    def __init__(
        self,
        upstream: str,
        *,
        upstream_timeout: float = 300,
        before: Callable[[str, str], None] | None = None,
        after: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self._upstream_timeout = upstream_timeout
        self._before, self._after = before, after
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``: use it as a registry host."""
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return self._server.address

    def start(self) -> Self:
        self._server = _Server(self.upstream, self._upstream_timeout)
        self._server.before, self._server.after = self._before, self._after
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"registry-proxy-{self.address}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = self._thread = None

    def stats(self) -> ProxyStats:
        """What the registry received so far (since start or the last ``reset``)."""
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return self._server.counters.snapshot()

    def reset(self) -> None:
        if self._server is not None:
            with self._server.counters.lock:
                self._server.counters.clear()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
