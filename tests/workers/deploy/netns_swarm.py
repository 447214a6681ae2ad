"""A tenant's swarm for the tests: a second dockerd in a network namespace the test makes, so
its own iptables (the namespace's, not the host's) publish ports, listening with TLS on an
address of its own on a veth pair to the host; `docker swarm init` on it. Images reach it from
the tests' registry through a forwarder listening on the namespace's loopback (an engine pulls
plain HTTP from 127.0.0.0/8). Everything is torn down on the way out, also after a failure: the
daemon and whatever runs in the namespace, its mounts, the namespace and the veth pair.

The host's iptables and the shared engine are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

_CLONE_NEWNET = 0x40000000
# A name the manager's certificate carries beside its address (no resolver knows it: a test
# that uses it answers the lookups itself).
MANAGER_NAME = "manager.tenant-swarm.test"
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class TenantSwarm:
    address: str  # the manager's, on its veth
    docker_host: str  # tcp://address:2376, TLS
    tls: dict[str, str]  # ca, cert, key: PEM, as a tenant attaches them
    api: docker.APIClient  # the test's own view (its unix socket)


def usable() -> str | None:
    """Why a tenant swarm cannot be made here, if so."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [tool for tool in ("dockerd", "ip", "nsenter", "openssl") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


@contextlib.contextmanager
def tenant_swarm(workdir: Path, *, registry_port: int, seconds: float = 60) -> Iterator[TenantSwarm]:
    tag = secrets.token_hex(3)
    netns, host_side, ns_side = f"mmst{tag}", f"mth{tag}", f"mtn{tag}"
    subnet = _free_slash30()
    host_ip, ns_ip = f"{subnet}.1", f"{subnet}.2"
    root = workdir / f"tenant-swarm-{tag}"
    root.mkdir(parents=True)
    dockerd: subprocess.Popen | None = None
    forwarder: _Forwarder | None = None
    api: docker.APIClient | None = None
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", host_side, "type", "veth", "peer", "name", ns_side)
        _run("ip", "link", "set", ns_side, "netns", netns)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_side)
        _run("ip", "link", "set", host_side, "up")
        for command in (
            ("ip", "addr", "add", f"{ns_ip}/30", "dev", ns_side),
            ("ip", "link", "set", ns_side, "up"),
            ("ip", "link", "set", "lo", "up"),
        ):
            _run("ip", "netns", "exec", netns, *command)
        tls = _certificates(root, ns_ip)
        dockerd = _start_dockerd(root, netns, ns_ip)
        sock = _wait_for(dockerd, root, seconds)
        api = docker.APIClient(base_url=f"unix://{sock}", version="auto", timeout=30)
        api.init_swarm(advertise_addr=ns_ip, listen_addr=f"{ns_ip}:2377")
        forwarder = _Forwarder(netns, registry_port)
        yield TenantSwarm(ns_ip, f"tcp://{ns_ip}:2376", tls, api)
    finally:
        if forwarder is not None:
            forwarder.stop()
        if api is not None:
            api.close()
        if dockerd is not None:
            _stop(dockerd)
        _kill_the_rest(netns)
        _unmount_under(root)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", host_side], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _start_dockerd(root: Path, netns: str, address: str) -> subprocess.Popen:
    """A dockerd in ``netns``: its data, exec root and unix socket under ``root``, TLS (the
    certificates ``_certificates`` wrote there) on ``address``:2376, the namespace's iptables."""
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115
    try:
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts dockerd needs.
        return subprocess.Popen(
            [
                "nsenter",
                f"--net=/var/run/netns/{netns}",
                "dockerd",
                f"--data-root={root / 'data'}",
                f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'dockerd.pid'}",
                f"--host=unix://{sock}",
                f"--host=tcp://{address}:2376",
                "--tlsverify",
                f"--tlscacert={root / 'ca.pem'}",
                f"--tlscert={root / 'server.pem'}",
                f"--tlskey={root / 'server-key.pem'}",
                "--iptables=true",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _wait_for(dockerd: subprocess.Popen, root: Path, seconds: float) -> Path:
    """The daemon's unix socket, once it answers."""
    sock = root / "docker.sock"
    deadline = time.monotonic() + seconds
    while not _answers(sock):
        assert dockerd.poll() is None, (root / "dockerd.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the tenant's dockerd never answered"
        time.sleep(0.3)
    return sock


def _answers(sock: Path) -> bool:
    """Whether the daemon answers GET /_ping on its unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        try:
            client.connect(str(sock))
            client.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b" 200 " in client.recv(64)
        except OSError:
            return False


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def _free_slash30() -> str:
    """The first three octets of a 10.250.x.0/30 no interface here uses."""
    taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=10).stdout
    for _ in range(50):
        prefix = f"10.250.{secrets.randbelow(256)}"
        if f" {prefix}." not in taken:
            return prefix
    raise AssertionError("no free 10.250.x.0/30")


def _certificates(root: Path, address: str, *, ca_from: Path | None = None) -> dict[str, str]:
    """A CA (``ca_from``'s, copied, if given), the daemon's certificate for ``address`` and a
    client certificate: PEM."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=60)

    (root / "server.ext").write_text(f"subjectAltName=IP:{address},DNS:{MANAGER_NAME}\nextendedKeyUsage=serverAuth\n")
    (root / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    if ca_from is None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca.pem",
                "-days", "2", "-subj", "/CN=tenant-ca")  # fmt: skip
    else:
        for name in ("ca.pem", "ca-key.pem"):
            shutil.copyfile(ca_from / name, root / name)
    for name, subject, ext in (("server", "/CN=tenant-swarm", "server.ext"), ("client", "/CN=mms", "client.ext")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}.csr",
                "-subj", subject)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", ext)  # fmt: skip
    return {
        "ca": (root / "ca.pem").read_text(),
        "cert": (root / "client.pem").read_text(),
        "key": (root / "client-key.pem").read_text(),
    }


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _kill_the_rest(netns: str) -> None:
    """What still runs in the namespace (a task's shim, a docker-proxy): ours, it is our namespace."""
    listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10).stdout
    for pid in listed.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _unmount_under(root: Path) -> None:
    prefix = f"{root}/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if f"{m}/".startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=10)


class _Forwarder:
    """Listens on the namespace's 127.0.0.1:``port`` and forwards each connection to the host's
    127.0.0.1:``port`` (the tests' registry). The listening socket is made inside the namespace
    (setns in a thread of its own); the connections it makes are the host's."""

    def __init__(self, netns: str, port: int) -> None:
        self._port = port
        self._stopping = threading.Event()
        made: list[socket.socket | BaseException] = []
        maker = threading.Thread(target=lambda: made.append(_listen_in(netns, port)))
        maker.start()
        maker.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        self._listener = made[0]
        self._open: list[socket.socket] = []  # every connection's two sockets: closed by stop()
        self._listener.settimeout(0.5)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
        for connection in self._open:
            connection.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                inside, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open.append(inside)
            try:
                outside = socket.create_connection(("127.0.0.1", self._port), timeout=10)
            except OSError:
                continue
            self._open.append(outside)
            for source, sink in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _listen_in(netns: str, port: int) -> socket.socket | BaseException:
    """A listening socket on the namespace's loopback (run in a thread of its own: setns moves
    only the calling thread, and this one ends after)."""
    target = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            return OSError(ctypes.get_errno(), "setns into the tenant's namespace failed")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(16)
        return listener
    except OSError as exc:
        return exc
    finally:
        os.close(target)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    source.settimeout(120)
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
