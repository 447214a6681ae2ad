"""The oci builder's RUN step network (workers/builders/step_network.py) and the runtime
wrapper's check of the namespace a step joins, without buildah: a real namespace held by a
real holder process, clients in it started with nsenter, a real TCP server on the host's
loopback as the proxy; the wrapper run as buildah runs it, on configs as buildah writes them,
with a stand-in for runc that records that it was started."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from workers.builders import buildah_steps, step_network
from workers.builders.buildah_steps import _Buildah
from workers.builders.run_limits import RunLimits
from workers.builders.step_network import StepNetwork, proxy_address

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nsenter") is None, reason="needs root (a network namespace) and nsenter"
)


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[str]]]:
    """A stand-in proxy on the host's loopback: answers each connection ``up:<what it got>``
    and keeps it open until the other side closes; yields its port and who connected."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    peers: list[str] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                conn.sendall(b"up:" + data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            peers.append(peer[0])
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], peers
    finally:
        stop.set()
        thread.join()
        server.close()


def _inside(network: StepNetwork, script: str, *args: str, timeout: float = 30) -> str:
    """Run python ``script`` in the steps' namespace; its output."""
    proc = subprocess.run(
        ["nsenter", f"--net={network.netns.path}", sys.executable, "-I", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.stdout + proc.stderr


CLIENTS = """
import socket, sys
port, count, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
conns = []
for n in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"c%d" % n)
    conns.append(s)
for n, s in enumerate(conns):
    try:
        print(f"c{n}=" + (s.recv(100).decode() or "closed"), flush=True)
    except OSError as exc:
        print(f"c{n}={type(exc).__name__}")
if hold:
    import time
    start = time.monotonic()
    data = conns[0].recv(100)
    print(f"held={data!r} after {time.monotonic() - start:.1f}")
"""


def test_a_connection_in_the_namespace_reaches_the_proxy_and_only_through_the_worker(
    upstream: tuple[int, list[str]],
) -> None:
    port, peers = upstream
    with StepNetwork(f"http://127.0.0.1:{port}") as network:
        assert network.environment["HTTPS_PROXY"] == f"http://127.0.0.1:{network.port}"
        assert network.environment["NO_PROXY"] == "" and network.environment["http_proxy"]
        out = _inside(network, CLIENTS, str(network.port), "2", "0")
        assert "c0=up:c0" in out and "c1=up:c1" in out, out
        # The proxy's own port, on the host's loopback, is not the namespace's loopback.
        direct = _inside(network, CLIENTS, str(port), "1", "0")
        assert "ConnectionRefusedError" in direct, direct
        assert _inside(network, "import os; print(sorted(os.listdir('/sys/class/net')))") != ""
        holder = Path(f"/proc/{network.netns.path.split('/')[2]}")
        assert network.netns.inode != os.stat("/proc/self/ns/net").st_ino
    assert peers == ["127.0.0.1", "127.0.0.1"]  # two connections piped, none for the direct try
    for _ in range(20):  # the holder exits, and with it the namespace
        if not holder.exists():
            break
        time.sleep(0.1)
    assert not holder.exists()


def test_connections_are_bounded_in_number_and_idle_time_and_end_with_the_build(
    upstream: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, _ = upstream
    monkeypatch.setattr(step_network, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(step_network, "IDLE_SECONDS", 2.0)
    with StepNetwork(f"http://127.0.0.1:{port}") as network:
        out = _inside(network, CLIENTS, str(network.port), "5", "1")
        answered = [line for line in out.splitlines() if "=up:" in line]
        assert len(answered) == 3, out  # the fourth and fifth closed at once
        assert network.refused == 2
        held = next(line for line in out.splitlines() if line.startswith("held="))
        assert held.startswith("held=b''") and float(held.split()[-1]) < 10, held  # closed when idle
        # A connection open when the build ends is closed with it (long before it is idle).
        monkeypatch.setattr(step_network, "IDLE_SECONDS", 300.0)
        client = subprocess.Popen(
            [
                "nsenter",
                f"--net={network.netns.path}",
                sys.executable,
                "-I",
                "-c",
                CLIENTS,
                str(network.port),
                "1",
                "1",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "c0=up:c0"  # connected, and waiting
        started = time.monotonic()
    with client:
        out = client.stdout.read()
    assert out.startswith("held=b''") and time.monotonic() - started < 10, out


def test_a_proxy_that_is_not_plain_http_host_and_port_is_refused() -> None:
    assert proxy_address("http://172.30.213.1:3128") == ("172.30.213.1", 3128)
    for bad in ("https://proxy:3128", "http://user:pw@proxy:3128", "proxy:3128", "http://"):
        with pytest.raises(ValueError):
            proxy_address(bad)


# -- the runtime wrapper: which network namespace a step may join ------------------------------


def _wrapper(tmp_path: Path, network: StepNetwork | None) -> tuple[Path, Path, dict]:
    """The wrapper as buildah runs it, for ``network``, with a stand-in runtime; and a config
    as buildah 1.28 writes it."""
    if shutil.which("runc") is None and shutil.which("crun") is None:
        pytest.skip("no runc")
    root = tmp_path / "buildah"
    root.mkdir()
    runner = _Buildah(root, RunLimits(), lambda _: None, network)
    ran = tmp_path / "ran"
    runner.runtime = str(tmp_path / "runtime")
    Path(runner.runtime).write_text(f'#!/bin/sh\necho "$@" > {ran}\n')
    Path(runner.runtime).chmod(0o755)
    wrapper = runner._write_runtime(SimpleNamespace(parent="/mms-test"))  # type: ignore[arg-type]
    mapping = [{"containerID": 0, "hostID": runner.host_id, "size": 65536}]
    config = {
        "process": {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_NET_ADMIN"]}},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": []},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["rw"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "user")],
            "uidMappings": mapping,
            "gidMappings": mapping,
            "seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}],
            },
        },
    }
    return wrapper, ran, config


def _run_wrapper(wrapper: Path, ran: Path, config: dict, bundle: Path, network_path: str | None) -> tuple[str, dict]:
    """Run the wrapper on ``config`` joining ``network_path`` (None: a namespace of its own);
    ``bundle`` is in the build's scratch folder, as buildah's are."""
    (bundle / "rootfs").mkdir(parents=True)
    namespaces = config["linux"]["namespaces"]
    for entry in namespaces:
        entry.pop("path", None)
        if entry["type"] == "network" and network_path is not None:
            entry["path"] = network_path
    (bundle / "config.json").write_text(json.dumps(config))
    ran.unlink(missing_ok=True)
    proc = subprocess.run(
        [str(wrapper), "create", "--bundle", str(bundle), "id"], capture_output=True, text=True, timeout=30, check=False
    )
    outcome = "ran" if ran.exists() else proc.stderr.strip().splitlines()[-1]
    return outcome, json.loads((bundle / "config.json").read_text())


def test_with_the_proxy_the_wrapper_lets_a_step_join_the_builds_namespace_and_no_other(
    tmp_path: Path, upstream: tuple[int, list[str]]
) -> None:
    port, _ = upstream
    with StepNetwork(f"http://127.0.0.1:{port}") as network:
        wrapper, ran, config = _wrapper(tmp_path, network)
        outcome, seen = _run_wrapper(wrapper, ran, config, tmp_path / "buildah" / "ok", network.netns.path)
        assert outcome == "ran"
        mounts = {m["destination"]: m for m in seen["mounts"]}
        assert mounts["/sys"]["type"] == "tmpfs" and "ro" in mounts["/sys"]["options"]  # not the host's sysfs
        assert "/sys/fs/cgroup" not in mounts
        assert seen["process"]["capabilities"]["bounding"] == ["CAP_CHOWN"]
        other = StepNetwork(f"http://127.0.0.1:{port}")  # another build's namespace
        with other:
            refusals = {
                "its own": None,
                "the host's": "/proc/1/ns/net",
                "the wrapper's own": "/proc/self/ns/net",
                "another build's": other.netns.path,
                "a path that is not a namespace": "/etc/hostname",
            }
            for number, (name, path) in enumerate(refusals.items()):
                outcome, _ = _run_wrapper(wrapper, ran, config, tmp_path / "buildah" / f"refused{number}", path)
                assert outcome.startswith("mms: refused:"), (name, outcome)
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
        outcome, _ = _run_wrapper(wrapper, ran, config, tmp_path / "buildah" / "none", None)
        assert outcome.startswith("mms: refused:"), outcome  # no network namespace at all: the host's


def test_without_the_proxy_the_wrapper_wants_a_namespace_of_the_steps_own(
    tmp_path: Path, upstream: tuple[int, list[str]]
) -> None:
    wrapper, ran, config = _wrapper(tmp_path, None)
    outcome, seen = _run_wrapper(wrapper, ran, config, tmp_path / "buildah" / "own", None)
    assert outcome == "ran"
    assert {m["destination"]: m["type"] for m in seen["mounts"]}["/sys"] == "sysfs"  # unchanged
    port, _ = upstream
    with StepNetwork(f"http://127.0.0.1:{port}") as network:
        for number, path in enumerate(("/proc/1/ns/net", network.netns.path)):
            outcome, _ = _run_wrapper(wrapper, ran, config, tmp_path / "buildah" / f"joined{number}", path)
            assert outcome.startswith("mms: refused:"), (path, outcome)


def test_the_wrapper_refuses_a_holder_pid_taken_by_another_process(
    tmp_path: Path, upstream: tuple[int, list[str]]
) -> None:
    # The policy names the build's namespace by path and inode: the same path now leading to
    # another namespace (the holder gone, its pid reused) is refused.
    port, _ = upstream
    with StepNetwork(f"http://127.0.0.1:{port}") as network:
        wrapper, ran, config = _wrapper(tmp_path, network)
        policy = wrapper.read_text()
        assert str(network.netns.inode) in policy
        wrapper.write_text(policy.replace(str(network.netns.inode), str(os.stat("/proc/self/ns/net").st_ino)))
        outcome, _ = _run_wrapper(wrapper, ran, config, tmp_path / "buildah" / "swapped", network.netns.path)
        assert outcome.startswith("mms: refused:"), outcome
    assert buildah_steps._STEP_CA_BUNDLE.startswith("/dev/")  # a tmpfs of the runtime's: not in the layer
