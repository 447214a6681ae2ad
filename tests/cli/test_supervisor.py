"""ChildProcess: the build worker `mms serve` keeps beside the API is restarted and stopped."""

from __future__ import annotations

import os
import sys
import time

from app.cli.supervisor import ChildProcess


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/status") as status:
        return "State:\tZ" not in status.read()


def test_a_child_that_dies_is_started_again() -> None:
    child = ChildProcess("short-lived", [sys.executable, "-c", "pass"])
    child.start()
    try:
        deadline = time.monotonic() + 15
        while child.restarts < 2:
            assert time.monotonic() < deadline, "the child was not restarted"
            time.sleep(0.1)
    finally:
        child.stop()


def test_stop_kills_a_child_that_ignores_sigterm_with_its_own_children(tmp_path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "grandchild = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(grandchild.pid))\n"
        "time.sleep(60)\n"
    )
    child = ChildProcess("stubborn", [sys.executable, "-c", script], stop_timeout=1.0)
    child.start()
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the child never started its own child"
        time.sleep(0.05)
    grandchild, pid = int(pid_file.read_text()), child.pid
    started = time.monotonic()
    child.stop()
    assert time.monotonic() - started < 5
    assert not _alive(pid)
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the worker's own children outlived it"
        time.sleep(0.05)


def test_a_child_waits_until_it_is_ready_to_start_and_not_at_all_once_stopped() -> None:
    # mms serve starts its build worker once the API listens: a build fetches from it.
    ready = False
    child = ChildProcess("waiting", [sys.executable, "-c", "import time; time.sleep(30)"])
    child.start(ready=lambda: ready)
    try:
        time.sleep(0.6)
        assert child.pid is None
        ready = True
        deadline = time.monotonic() + 10
        while child.pid is None:
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        assert _alive(child.pid)
    finally:
        child.stop()
    never = ChildProcess("never", [sys.executable, "-c", "pass"])
    never.start(ready=lambda: False)
    never.stop()
    time.sleep(0.5)
    assert never.pid is None
