"""`mms serve --workers N`: each API process accepts on a socket of its own, so connections
spread over the processes; a process that dies is replaced; one that cannot start stops the
command instead of being restarted for ever."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.embedded_service import EmbeddedService, alive, free_port


def _service(tmp_path: Path) -> EmbeddedService:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    port, data_dir = free_port(), tmp_path / "data"
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text"})
    return EmbeddedService(env, port, data_dir, tmp_path)


def _sockets(port: int) -> list[set[int]]:
    """For each socket listening on ``port``, the pids that hold it."""
    out = subprocess.run(["ss", "-tlnpH", f"( sport = :{port} )"], capture_output=True, text=True, check=True).stdout
    return [{int(pid) for pid in re.findall(r"pid=(\d+)", line)} for line in out.splitlines()]


def _listeners(port: int) -> set[int]:
    """The pids with a socket listening on ``port``."""
    return set().union(*_sockets(port))


def _wait_for_listeners(port: int, count: int, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while len(found := _listeners(port)) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} API processes listen"
        time.sleep(0.2)
    return found


def _log(tmp_path: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("serve-*.log"))


def _flaky_supervisor(port: int) -> str:
    """A program running two API processes of tests/cli/flaky_app.py on ``port``."""
    return (
        "import sys\n"
        "from app.cli.api_processes import run_api_processes\n"
        f"config = {{'app': 'tests.cli.flaky_app:factory', 'factory': True, 'host': '127.0.0.1', 'port': {port}}}\n"
        "sys.exit(run_api_processes(2, config))\n"
    )


def test_connections_spread_over_the_api_processes(tmp_path: Path) -> None:
    service = _service(tmp_path)
    server = service.serve("--workers", "2", "--no-build-worker")
    try:
        api = _wait_for_listeners(service.port, 2)
        # A socket each, held by that process alone (uvicorn's --workers: one socket, held
        # by the parent and every process, which took 22-24 of wrk's 32 connections in one).
        assert sorted(map(sorted, _sockets(service.port))) == sorted([pid] for pid in api)
        connections = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(32)]
        try:
            for sock in connections:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            out = subprocess.run(
                ["ss", "-tnpH", "state", "established", f"( sport = :{service.port} )"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            served = Counter(int(pid) for pid in re.findall(r"pid=(\d+)", out))
        finally:
            for sock in connections:
                sock.close()
        assert set(served) == api, served
        # Hashed by the kernel: with one shared socket, one process took 22-24 of them.
        # Either process under 6 of 32 happens with a chance of about 1 in 10,000.
        assert min(served.values()) >= 6, served
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, _log(tmp_path)[-3000:]
    assert not _listeners(service.port)


def test_a_killed_api_process_is_replaced_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    service = _service(tmp_path)
    server = service.serve("--workers", "2", "--no-build-worker")
    try:
        first = _wait_for_listeners(service.port, 2)
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(now := _listeners(service.port)) < 2 or victim in now:
            assert time.monotonic() < deadline, f"not replaced: {now}"
            assert httpx.get(f"{service.url}/health", timeout=5).status_code == 200  # the other one serves
            time.sleep(0.2)
        assert now - first and (first - {victim}) <= now
    finally:
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=60)
    assert status == 0, _log(tmp_path)[-3000:]
    assert not any(alive(pid) for pid in now)
    assert not _listeners(service.port)


def test_a_port_another_program_holds_stops_the_command_with_an_error(tmp_path: Path) -> None:
    service = _service(tmp_path)
    with socket.socket() as taken:  # no SO_REUSEPORT: the API processes cannot join it
        taken.bind(("127.0.0.1", service.port))
        taken.listen()
        started = time.monotonic()
        server = subprocess.run(
            [sys.executable, "-m", "app.cli", "serve", "--workers", "2", "--no-build-worker", "--host", "127.0.0.1"],
            env=service.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert server.returncode != 0
    assert time.monotonic() - started < 60
    assert "Address already in use" in server.stderr + server.stdout, server.stderr[-3000:]


def test_an_api_process_freezes_what_it_made_at_start(tmp_path: Path) -> None:
    # A full collection walks every object the process holds: ~100 ms for what the app holds
    # at start, a pause that every request in flight waits out. Frozen, they are not walked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    env["MMS_DATA_DIR"] = str(tmp_path / "data")
    probe = (
        "import gc, statistics, time\n"
        "from app.main import app_factory\n"
        "def collection():\n"
        "    times = []\n"
        "    for _ in range(3):\n"
        "        started = time.perf_counter(); gc.collect(); times.append(time.perf_counter() - started)\n"
        "    return statistics.median(times)\n"
        "app_factory()\n"
        "frozen, frozen_collection = gc.get_freeze_count(), collection()\n"
        "gc.unfreeze()\n"
        "print(frozen, frozen_collection, collection())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    frozen, frozen_collection, whole_collection = out.stdout.split()
    assert int(frozen) > 100_000
    assert float(frozen_collection) * 10 < float(whole_collection), out.stdout


def test_a_process_that_cannot_start_after_the_api_has_served_is_retried_and_the_others_serve_on(
    tmp_path: Path,
) -> None:
    # Not fatal once the API has served: the cause is passing (the database failing over), and
    # stopping every process for it would take the whole API down.
    port, fail = free_port(), tmp_path / "fail-start"
    supervisor = _flaky_supervisor(port)
    env = {**os.environ, "MMS_TEST_FAIL_START": str(fail)}
    parent = subprocess.Popen([sys.executable, "-c", supervisor], env=env, stderr=subprocess.PIPE, text=True)
    try:
        first = _wait_for_listeners(port, 2)
        time.sleep(11)  # past a start: the API has served
        fail.touch()
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        time.sleep(4)  # its replacement fails to start, twice
        assert parent.poll() is None, "the supervisor stopped"
        assert _listeners(port) == first - {victim}
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == str(max(first))
        fail.unlink()
        deadline = time.monotonic() + 30
        while len(now := _listeners(port)) < 2:
            assert time.monotonic() < deadline, "not replaced once it could start"
            time.sleep(0.2)
        assert max(first) in now
    finally:
        parent.send_signal(signal.SIGTERM)
        _, stderr = parent.communicate(timeout=60)
        status = parent.returncode
    assert status == 0, stderr[-3000:]
    assert "cannot start now" in stderr, stderr[-3000:]


def test_a_process_backing_off_does_not_delay_the_restart_of_another(tmp_path: Path) -> None:
    # Each process waits out its own backoff: a second one dying meanwhile is started again
    # at once, not after the first one's wait (up to a minute).
    port, fail, stderr_file = free_port(), tmp_path / "fail-start", tmp_path / "stderr"
    supervisor = _flaky_supervisor(port)
    env = {**os.environ, "MMS_TEST_FAIL_START": str(fail)}
    with stderr_file.open("w") as stderr:
        parent = subprocess.Popen([sys.executable, "-c", supervisor], env=env, stderr=stderr, text=True)
    try:
        first = _wait_for_listeners(port, 2)
        time.sleep(11)  # past a start: the API has served
        fail.touch()
        backing_off, other = sorted(first)
        os.kill(backing_off, signal.SIGKILL)
        # Its replacements fail to start, waiting 2 s, then 4 s; after the third it waits 8 s.
        deadline = time.monotonic() + 30
        while stderr_file.read_text().count("RuntimeError: cannot start now") < 3:
            assert time.monotonic() < deadline, stderr_file.read_text()[-3000:]
            time.sleep(0.1)
        fail.unlink()
        os.kill(other, signal.SIGKILL)
        killed = time.monotonic()
        while not (now := _listeners(port)) - first:
            assert time.monotonic() - killed < 7, "the second process waited on the first one's backoff"
            time.sleep(0.1)
        assert len(now) == 1, "the first process is still waiting out its backoff"
        _wait_for_listeners(port, 2, timeout=30)
    finally:
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=60)
    assert parent.returncode == 0, stderr_file.read_text()[-3000:]


def test_a_process_that_cannot_be_started_leaves_none_of_the_others_running(tmp_path: Path) -> None:
    # The second start fails (the system out of processes): the first process is stopped, not
    # left serving for a supervisor that no longer supervises.
    port = free_port()
    supervisor = (
        "import multiprocessing.context as context, sys, time\n"
        "from app.cli.api_processes import run_api_processes\n"
        "original, calls = context.SpawnProcess.start, []\n"
        "def start(self):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        raise OSError(11, 'Resource temporarily unavailable')\n"
        "    original(self)\n"
        "    print('child', self.pid, flush=True)\n"
        "context.SpawnProcess.start = start\n"
        f"config = {{'app': 'tests.cli.flaky_app:factory', 'factory': True, 'host': '127.0.0.1', 'port': {port}}}\n"
        "try:\n"
        "    run_api_processes(2, config)\n"
        "except OSError as exc:\n"
        "    print('failed', exc, flush=True)\n"
        "time.sleep(60)  # the supervisor's process lives on: its children must not\n"
    )
    env = {**os.environ, "MMS_TEST_FAIL_START": str(tmp_path / "never")}
    parent = subprocess.Popen([sys.executable, "-c", supervisor], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline().split()[1])
        assert parent.stdout.readline().startswith("failed")
        assert not alive(child), "the first process outlived the failed start"
        assert _listeners(port) == set()
    finally:
        parent.kill()
        parent.communicate(timeout=30)
