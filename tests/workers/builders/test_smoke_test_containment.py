"""The smoke test's container holds a tenant's init(): no network, no secrets, hard limits.

Each image is built with the docker builder (the base and a score.py whose init() attacks),
or straight from a Dockerfile for the probe's own failures; the smoke test runs it on the
real engine (scripts/infra).
"""

from __future__ import annotations

import io
import re
import socket
import tarfile
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.infra import Infra
from tests.workers.builders.test_docker_builder import build
from workers.builders.docker import DockerBuilder
from workers.smoke_test import SmokeTestFailed, smoke_test

# The host's loopback services, the engine (its socket and the compose profile's plain TCP
# port) and cloud metadata: init() tries each, records what happened, and carries on.
ATTACKS = """\
import os, socket

TARGETS = [("host-listener", ("127.0.0.1", {port})), ("engine-tcp", ("127.0.0.1", 2375)),
           ("metadata", ("169.254.169.254", 80))]
SOCKETS = [("engine-socket", {engine_socket!r}), ("engine-socket", "/var/run/docker.sock")]

def cgroup(*names):
    for name in names:
        try:
            with open("/sys/fs/cgroup/" + name) as f:
                return f.read().split()
        except OSError:
            pass
    return ["?"]

def init():
    for name, address in TARGETS:
        try:
            socket.create_connection(address, timeout=3).close()
            print("attack", name, "connected")
        except OSError as exc:
            print("attack", name, "failed:", repr(exc))
    for name, path in SOCKETS:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            print("attack", name, path, "connected")
        except OSError as exc:
            print("attack", name, path, "failed:", repr(exc))
        finally:
            sock.close()
    with open("/proc/1/environ", "rb") as f:
        print("environ of pid 1:", f.read().replace(b"\\0", b" ").decode())
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines())
    print("CapEff", status["CapEff"].strip(), "NoNewPrivs", status["NoNewPrivs"].strip())
    print("limit memory", cgroup("memory/memory.limit_in_bytes", "memory.max")[0])
    print("limit pids", cgroup("pids/pids.max", "pids.max")[0])
    quota = cgroup("cpu/cpu.cfs_quota_us", "cpu.max")[0]
    period = cgroup("cpu/cpu.cfs_period_us", "cpu.max")[-1]
    print("limit cpus", int(quota) / int(period))

def run(data):
    return data
"""

MEMORY_HOG = """\
def init():
    hoard = []
    for _ in range(64):  # 4 GiB at most, every page written
        hoard.append(b"x" * (64 << 20))
    print("allocated", len(hoard) * 64, "MB")

def run(data):
    return data
"""

# Every process forks, children too: 2**8 processes at most even where nothing limits them.
# They all hold on, so the server never comes up.
FORK_BOMB = """\
import os, time

def init():
    for _ in range(8):
        try:
            os.fork()
        except OSError as exc:
            print("fork failed:", repr(exc), flush=True)
            break
    time.sleep(60)
    os._exit(0)

def run(data):
    return data
"""

# 1 MB a file, with pauses, until it has written 400 MB: measured while it runs.
DISK_FILLER = """\
import time

def init():
    for i in range(400):
        with open(f"/tmp/fill{i}", "wb") as f:
            f.write(b"x" * (1 << 20))
        time.sleep(0.02)
    print("wrote-all", flush=True)

def run(data):
    return data
"""

# One file past the limit: the kernel refuses the write at once (RLIMIT_FSIZE).
BIG_FILE = """\
def init():
    with open("/tmp/big", "wb") as f:
        for _ in range(80):
            f.write(b"x" * (1 << 20))
    print("wrote-all", flush=True)

def run(data):
    return data
"""


@pytest.fixture
def builder(infra: Infra) -> DockerBuilder:
    return DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP server on the host's loopback that init() must not reach."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server


def container_id(log_lines: list[str]) -> str:
    """The short id the smoke test logged for the container it started."""
    started = next(line for line in log_lines if "mms: smoke test: started" in line)
    return re.search(r"\(([0-9a-f]{12})\)", started)[1]


def assert_removed(infra: Infra, short_id: str) -> None:
    with infra.api() as api:
        assert not api.containers(all=True, filters={"id": short_id})


def test_init_reaches_neither_the_host_nor_the_engine_nor_metadata_and_sees_no_secret(
    infra, make_spec, builder, listener, log_lines, monkeypatch
):
    secret = f"worker-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("MMS_SECRET_KEY", secret)  # as a worker's environment holds it
    engine_socket = (infra.docker_host or "unix:///var/run/docker.sock").removeprefix("unix://")
    score = ATTACKS.format(port=listener.getsockname()[1], engine_socket=engine_socket)
    result = build(infra, builder, make_spec(score), "attacks", "1", log_lines.append)

    smoke_test(
        infra.docker_host, result.image_location, log_lines.append, timeout=60, memory_mb=1024, pids=200, cpus=0.5
    )

    log = "\n".join(log_lines)
    assert "smoke test passed" in log
    for name in ("host-listener", "engine-tcp", "metadata", "engine-socket"):
        assert f"attack {name} " in log, name
    assert " connected" not in log
    assert re.search(r"attack host-listener failed: ConnectionRefusedError", log)
    assert re.search(r"attack engine-tcp failed: ConnectionRefusedError", log)
    assert re.search(r"attack metadata failed: OSError\(101, 'Network is unreachable'\)", log)
    assert re.search(
        rf"attack engine-socket {re.escape(engine_socket)} failed: "
        r"FileNotFoundError",
        log,
    )
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # nobody knocked
        listener.accept()
    environ = next(line for line in log_lines if "environ of pid 1:" in line)
    assert "PORT=5001" in environ and "HOST=127.0.0.1" in environ  # what the smoke test sets
    assert "MMS_" not in environ and secret not in log
    assert "CapEff 0000000000000000 NoNewPrivs 1" in log
    assert f"limit memory {1024 << 20}" in log
    assert "limit pids 200" in log
    assert "limit cpus 0.5" in log
    assert_removed(infra, container_id(log_lines))


def test_a_memory_hog_is_stopped_by_the_memory_limit_which_the_failure_names(infra, make_spec, builder, log_lines):
    result = build(infra, builder, make_spec(MEMORY_HOG), "hog", "1", log_lines.append)

    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=60, memory_mb=256)

    assert "the container ran out of memory (limit 256 MB)" in failed.value.message
    assert "allocated" not in "\n".join(log_lines)
    assert log_lines[-1].startswith("mms: smoke test failed: the container ran out of memory")
    assert_removed(infra, container_id(log_lines))


def test_a_fork_bomb_is_stopped_by_the_process_limit_which_the_failure_names(infra, make_spec, builder, log_lines):
    result = build(infra, builder, make_spec(FORK_BOMB), "forkbomb", "1", log_lines.append)

    started = time.monotonic()
    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=30, pids=64)
    seconds = time.monotonic() - started

    assert "process limit (64 processes and threads)" in failed.value.message
    assert seconds < 30  # stopped by the limit, not by the time limit
    assert_removed(infra, container_id(log_lines))


def test_what_init_writes_is_bounded_in_all_and_for_each_file(infra, make_spec, builder, log_lines):
    filler = build(infra, builder, make_spec(DISK_FILLER), "filler", "1", log_lines.append)
    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, filler.image_location, log_lines.append, timeout=60, disk_mb=50)
    assert failed.value.message == (
        "the container wrote more than its disk limit of 50 MB (MMS_SMOKE_TEST_DISK_MB) before answering GET /"
    )
    assert_removed(infra, container_id(log_lines))

    big = build(infra, builder, make_spec(BIG_FILE), "bigfile", "1", log_lines.append)
    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, big.image_location, log_lines.append, timeout=60, disk_mb=50)
    assert "File too large" in failed.value.message
    assert "wrote-all" not in "\n".join(log_lines)


def tiny_image(infra: Infra, name: str, dockerfile: str, files: dict[str, bytes]) -> str:
    """An image built straight from ``dockerfile`` and ``files`` (no RUN step, no network)."""
    image = f"{infra.prefix}-{name}:1"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for path, data in {"Dockerfile": dockerfile.encode(), **files}.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    with infra.api() as api:
        for chunk in api.build(fileobj=context, custom_context=True, tag=image, rm=True, decode=True):
            assert "error" not in chunk, chunk
    infra.local_images.append(image)
    return image


def test_an_image_without_python3_on_its_path_fails_saying_the_probe_could_not_run(infra, log_lines):
    dockerfile = f'FROM {infra.base_image}\nENV PATH=/nowhere\nCMD ["/bin/sleep", "60"]\n'
    image = tiny_image(infra, "nopython", dockerfile, {})

    # More CPUs than the engine's machine has: it would refuse them, so it gets all it has.
    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, image, log_lines.append, timeout=30, cpus=512)

    message = failed.value.message
    assert message.startswith(
        "could not ask GET / inside the container: the probe (python3 on the image's PATH) failed with code 126"
    )
    assert "executable file not found" in message
    assert_removed(infra, container_id(log_lines))


def test_a_python3_that_prints_without_end_fails_the_probe_and_the_worker_keeps_little(infra, log_lines):
    dockerfile = f'FROM {infra.base_image}\nCOPY python3 /usr/local/bin/python3\nCMD ["/bin/sleep", "60"]\n'
    flood = b"#!/bin/sh\nexec yes mms-probe-0123456789abcdef0123456789abcdef\n"
    image = tiny_image(infra, "flood", dockerfile, {"python3": flood})

    started = time.monotonic()
    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, image, log_lines.append, timeout=30)

    assert failed.value.message.startswith(
        "could not ask GET / inside the container: the probe (python3 on the image's PATH)"
    )
    assert len(failed.value.message) < 1000
    assert time.monotonic() - started < 30
    assert_removed(infra, container_id(log_lines))
