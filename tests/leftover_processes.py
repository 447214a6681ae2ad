"""A pytest plugin that fails the session when a process the tests started outlives it.

At start-up the session puts a marker of its own in ``os.environ`` (``TEST_SESSION_MARKER``),
so every process a test, a fixture or a script they run starts inherits it. When the session
ends (after every fixture's teardown), a process that still carries this session's marker,
or is still a descendant of pytest, is a leftover: the session lists it, kills it and fails.

The marker's name does not start with ``MMS_``: several tests pass the CLI an environment
without the ``MMS_`` settings, and the marker must stay in it.

Two kinds of process escape the marker: one started with an environment of its own, and one
forked without an ``exec`` (its ``/proc/<pid>/environ`` is its parent's, from before the marker
was set). The descendant check sees them while they are pytest's; daemonised, they escape.

Shared infrastructure that is meant to outlive the session (the Docker engine, its build
network's proxy) is started without the marker: see :func:`shared_infrastructure_env`.
Processes a fixture leaves running on purpose, for another session that still uses them,
are named with :func:`hand_over`.

Under xdist each worker keeps its controller's marker (it inherits the environment) and the
controller alone checks, after its workers are gone.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pytest

MARKER = "TEST_SESSION_MARKER"
GRACE_SECONDS = 5.0  # a process that was told to stop may still be on its way out
# pytest's own helpers, not a test's: children of this interpreter that live as long as it does.
INTERPRETER_HELPERS = {
    # Started by the first multiprocessing "spawn" (tests/image_store/test_oci_layout.py); it exits when
    # its pipe from this interpreter closes, i.e. when pytest exits.
    "from multiprocessing.resource_tracker import main": "multiprocessing's resource tracker",
    "from multiprocessing.forkserver import main": "multiprocessing's fork server",
}
_MARKER = pytest.StashKey[tuple[str, str | None]]()  # this session's, and the one it replaced
_HANDED_OVER = pytest.StashKey[dict[int, str]]()
_LEFTOVERS = pytest.StashKey[list["Leftover"]]()


@dataclass(frozen=True)
class Leftover:
    pid: int
    cmdline: str


def shared_infrastructure_env() -> dict[str, str]:
    """The environment for a script that starts infrastructure meant to outlive the session."""
    return {key: value for key, value in os.environ.items() if key != MARKER}


def hand_over(config: pytest.Config, pids: list[int], reason: str) -> None:
    """Leave ``pids`` running at the session's end: another session still uses them."""
    config.stash.setdefault(_HANDED_OVER, {}).update(dict.fromkeys(pids, reason))


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    if _is_xdist_worker(config):
        return
    # Always a new one: a session started by a test (pytester) checks its own processes only.
    marker = uuid.uuid4().hex
    config.stash[_MARKER] = (marker, os.environ.get(MARKER))
    os.environ[MARKER] = marker


def pytest_unconfigure(config: pytest.Config) -> None:
    if _MARKER not in config.stash:
        return
    _, replaced = config.stash[_MARKER]  # an in-process pytester session gives the outer one its marker back
    if replaced is None:
        os.environ.pop(MARKER, None)
    else:
        os.environ[MARKER] = replaced


@pytest.hookimpl(trylast=True)  # after xdist has shut its workers down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if _MARKER not in config.stash:  # an xdist worker: its controller checks
        return
    marker, _ = config.stash[_MARKER]
    handed_over = config.stash.get(_HANDED_OVER, {})
    deadline = time.monotonic() + GRACE_SECONDS
    while (leftovers := find_leftovers(marker, handed_over)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not leftovers:
        return
    config.stash[_LEFTOVERS] = leftovers
    _kill([leftover.pid for leftover in leftovers])
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for pid, reason in config.stash.get(_HANDED_OVER, {}).items():
        terminalreporter.line(f"left running: pid {pid} ({reason})")
    leftovers = config.stash.get(_LEFTOVERS, [])
    if not leftovers:
        return
    terminalreporter.section("processes left running", sep="=", red=True, bold=True)
    terminalreporter.line(
        f"{len(leftovers)} process(es) started by this session were still running after it ended "
        "(killed now; the test or fixture that started each must stop it, also when it fails):",
        red=True,
    )
    for leftover in leftovers:
        terminalreporter.line(f"  pid {leftover.pid}: {leftover.cmdline}")


def find_leftovers(marker: str, ignore: Collection[int] = ()) -> list[Leftover]:
    """Live processes carrying ``marker`` or descended from this one, except this one and its ancestors."""
    own = _ancestors(os.getpid())
    parents = {pid: _parent(pid) for pid in _pids()}
    found = []
    for pid, parent in parents.items():
        if pid in own or pid in ignore or parent is None:  # gone, or a zombie: nothing to stop
            continue
        if not (_carries(pid, marker) or _descends_from(pid, os.getpid(), parents)):
            continue
        cmdline = _cmdline(pid)
        if parent == os.getpid() and any(helper in cmdline for helper in INTERPRETER_HELPERS):
            continue
        found.append(Leftover(pid, cmdline))
    return found


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _parent(pid: int) -> int | None:
    """The parent's pid; None when the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, parent = stat.rpartition(")")[2].split()[:2]  # the name in (...) may hold spaces
    return None if state == "Z" else int(parent)


def is_running(pid: int) -> bool:
    """The process is there and not a zombie."""
    return _parent(pid) is not None


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 0 and pid not in found:
        found.add(pid)
        pid = _parent(pid) or 0
    return found


def _descends_from(pid: int, ancestor: int, parents: dict[int, int | None]) -> bool:
    seen = set()
    while pid and pid not in seen:
        seen.add(pid)
        pid = parents.get(pid) or 0
        if pid == ancestor:
            return True
    return False


def _carries(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or another user's
        return False
    return f"{MARKER}={marker}".encode() in environ.split(b"\0")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _started(pid: int) -> str | None:
    """When the process started (clock ticks since boot), or None once it is gone: with the pid it
    names one process, where a pid alone may have been given to another since."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL whatever is still there after a few seconds (the same processes:
    a pid that exited and was given to another process is left alone)."""
    started = {pid: _started(pid) for pid in pids}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if started[pid] is None or _started(pid) != started[pid]:
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
            time.sleep(0.1)
