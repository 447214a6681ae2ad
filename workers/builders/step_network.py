"""The network of the oci builder's RUN steps: the build's egress proxy, and nothing else.

Per build, a network namespace that has only its loopback, held by a small process of its own
(the "holder": it unshares the namespace, brings ``lo`` up, listens on ``127.0.0.1:<port>``
there, hands the listening socket to the worker over a socket pair and waits until its input
closes). The steps join that namespace (buildah ``--network ns:/proc/<holder>/ns/net``) and get
``HTTP(S)_PROXY=http://127.0.0.1:<port>``. The worker, in its own namespace, accepts on that
socket and pipes each connection to the egress proxy (``MMS_BUILD_PROXY``), which lets through
``MMS_BUILD_ALLOW_HOSTS`` by name (scripts/infra/build-network.sh). A step has no route and no
address but ``127.0.0.1``, so that port is all it reaches: not the host's loopback or
addresses, the engine, the registry, 169.254.169.254 or another build (each build has a
namespace of its own). The namespace belongs to the host's user namespace, so the step's root
(in a user namespace of its own) cannot change it: no new interfaces, addresses or raw sockets.

Bounded: at most ``MAX_CONNECTIONS`` at once (more are closed at once), each closed after
``IDLE_SECONDS`` without a byte either way, all closed when the steps end.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
from contextlib import suppress
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit

__all__ = ["StepNetwork", "proxy_address"]

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # pip opens a handful; a step cannot hold the worker's sockets beyond this
IDLE_SECONDS = 300.0  # a connection silent both ways this long is closed
_CONNECT_SECONDS = 10.0
_CHUNK = 65536
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")

# Run by ``python -I -c``: argv[1] is its end of the socket pair, stdin the worker's pipe (its
# end closes when the worker ends or stops it: the holder then exits, and the namespace goes
# with the last of it).
_HOLDER = """\
import ctypes, fcntl, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
    sys.exit(f"unshare(CLONE_NEWNET) failed: errno {ctypes.get_errno()}")
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # lo up: SIOCGIFFLAGS, SIOCSIFFLAGS
    flags = struct.unpack("16sh", fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0)))[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))
listener = socket.create_server(("127.0.0.1", 0), backlog=64)
with socket.socket(fileno=int(sys.argv[1])) as channel:
    socket.send_fds(channel, [b"%d" % listener.getsockname()[1]], [listener.fileno()])
listener.close()
sys.stdin.buffer.read()
"""


def proxy_address(proxy: str) -> tuple[str, int]:
    """``http://host:port`` as (host, port); ValueError when it is not one."""
    parts = urlsplit(proxy)
    if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"the build proxy must be http://host:port, not {proxy!r}")
    return parts.hostname, parts.port or 80


@dataclass(frozen=True)
class NetnsIdentity:
    """What the steps' namespace is: its path, and the device and inode behind it."""

    path: str
    device: int
    inode: int


class StepNetwork:
    """A build's namespace for its RUN steps and the forwarder to the egress proxy (a context
    manager: everything it started ends on exit)."""

    def __init__(self, proxy: str) -> None:
        self.upstream = proxy_address(proxy)
        self._holder: subprocess.Popen | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # both ends of every connection
        self._connections = 0
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.refused = 0  # connections closed at once, past MAX_CONNECTIONS

    def __enter__(self) -> Self:
        try:
            self._start_holder()
        except BaseException:
            self.close()
            raise
        accepter = threading.Thread(target=self._accept, name="step-network-accept", daemon=True)
        accepter.start()
        self._threads.append(accepter)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def netns(self) -> NetnsIdentity:
        assert self._holder is not None
        path = f"/proc/{self._holder.pid}/ns/net"
        info = os.stat(path)
        return NetnsIdentity(path, info.st_dev, info.st_ino)

    @property
    def environment(self) -> dict[str, str]:
        """The steps' proxy variables (for the run only, never the image's): nothing bypasses it."""
        url = f"http://127.0.0.1:{self.port}"
        return {**dict.fromkeys(_PROXY_VARIABLES, url), "NO_PROXY": "", "no_proxy": ""}

    def _start_holder(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            self._holder = subprocess.Popen(
                [sys.executable, "-I", "-c", _HOLDER, str(theirs.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
            theirs.close()
            ours.settimeout(10)
            try:
                message, fds, _, _ = socket.recv_fds(ours, 32, 1)
            except OSError as exc:
                message, fds = b"", []
                logger.warning("build.step_network_failed", extra={"detail": str(exc)})
        if not fds or not message.isdigit():
            for fd in fds:
                os.close(fd)
            reason = self._holder_error()
            raise OSError(f"the RUN steps' network namespace could not be made: {reason}")
        self._listener = socket.socket(fileno=fds[0])
        self.port = int(message)
        if self.netns.inode == os.stat("/proc/self/ns/net").st_ino:
            raise OSError("the RUN steps' network namespace is the worker's own")

    def _holder_error(self) -> str:
        assert self._holder is not None and self._holder.stderr is not None
        with suppress(subprocess.TimeoutExpired):
            self._holder.wait(timeout=5)
        if self._holder.returncode is None:
            return "its holder process did not answer"
        lines = self._holder.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"its holder process exited with code {self._holder.returncode}"

    def _accept(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.25)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            with self._lock:
                if self._connections >= MAX_CONNECTIONS:
                    self.refused += 1
                    client.close()
                    continue
                self._connections += 1
                self._open.add(client)
            thread = threading.Thread(target=self._forward, args=(client,), name="step-network-pipe", daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _forward(self, client: socket.socket) -> None:
        upstream = None
        try:
            upstream = socket.create_connection(self.upstream, timeout=_CONNECT_SECONDS)
            with self._lock:
                if self._stop.is_set():
                    return
                self._open.add(upstream)
            _pipe(client, upstream, self._stop)
        except OSError as exc:
            logger.info("build.step_network_connection", extra={"detail": f"{type(exc).__name__}: {exc}"})
        finally:
            with self._lock:
                self._connections -= 1
                self._open.discard(client)
                if upstream is not None:
                    self._open.discard(upstream)
            client.close()
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for sock in self._open:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
        holder = self._holder
        if holder is not None and holder.returncode is None:
            assert holder.stdin is not None
            holder.stdin.close()  # its input ends: it exits
            try:
                holder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait(timeout=5)
        if holder is not None and holder.stderr is not None:
            holder.stderr.close()


def _pipe(client: socket.socket, upstream: socket.socket, stop: threading.Event) -> None:
    """Copy bytes both ways until both sides are done, one goes silent too long, or ``stop``."""
    peers = {client: upstream, upstream: client}
    done: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while len(done) < 2 and not stop.is_set():
            ready = selector.select(timeout=IDLE_SECONDS)
            if not ready:
                return  # idle both ways
            for key, _ in ready:
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    data = source.recv(_CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    selector.unregister(source)
                    done.add(source)
                    with suppress(OSError):
                        peers[source].shutdown(socket.SHUT_WR)
                    continue
                _send_all(peers[source], data, stop)


def _send_all(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    view = memoryview(data)
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_WRITE)
        while view and not stop.is_set():
            if not selector.select(timeout=IDLE_SECONDS):
                raise TimeoutError("the peer took nothing for too long")
            try:
                sent = sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            view = view[sent:]
