"""Keep one child process running beside the API: the build worker ``mms serve`` starts itself.

The embedded default has no separate worker to start, so ``mms serve`` runs ``mms worker``
as a child and restarts it when it dies (a crash must not leave builds queued forever),
backing off when it keeps dying. The child is told to stop when the server stops, and,
on Linux, the kernel stops it if the server is killed outright.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("mms.supervisor")

_QUICK_EXIT_SECONDS = 10.0  # a child that dies sooner than this counts as failing to start
_MAX_BACKOFF_SECONDS = 60.0


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this child when its parent dies (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ChildProcess:
    """Runs ``argv`` until ``stop()``, restarting it with backoff whenever it exits."""

    def __init__(self, name: str, argv: Sequence[str], *, stop_timeout: float = 15.0) -> None:
        self.name = name
        self.argv = list(argv)
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self._ready: Callable[[], bool] | None = None
        self._ready_wait = 0.0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, *, ready: Callable[[], bool] | None = None, wait: float = 120.0) -> None:
        """Start the child now, or once ``ready()`` is true (polled, for ``wait`` seconds at
        most: then it starts anyway)."""
        if ready is None:
            self._spawn()
        else:
            self._ready, self._ready_wait = ready, wait
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            # Its own process group, so a kill reaches its pool processes too.
            self._process = subprocess.Popen(
                self.argv,
                preexec_fn=die_with_parent,  # noqa: PLW1509
                start_new_session=True,
            )
            log.info("child.started", extra={"child": self.name, "pid": self._process.pid})

    def _watch(self) -> None:
        # Spawned from this thread, which lives as long as the child: the kernel's
        # parent-death signal fires when the spawning thread ends, not the process.
        if self._process is None and self._ready is not None:
            deadline = time.monotonic() + self._ready_wait
            while not self._ready() and time.monotonic() < deadline:
                if self._stopping.wait(0.2):
                    return
            self._spawn()
        backoff = 1.0
        while not self._stopping.is_set():
            process = self._process
            started = time.monotonic()
            code = process.wait() if process else 0
            if self._stopping.is_set():
                return
            lived = time.monotonic() - started
            backoff = backoff * 2 if lived < _QUICK_EXIT_SECONDS else 1.0
            delay = min(backoff, _MAX_BACKOFF_SECONDS)
            log.warning("child.exited", extra={"child": self.name, "exitCode": code, "restartInSeconds": delay})
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()

    def stop(self) -> None:
        """SIGTERM (a Celery worker's warm shutdown), then SIGKILL after ``stop_timeout``.

        A build cut off here is not lost: its lease expires and the reaper queues it again.
        """
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("child.killed", extra={"child": self.name, "pid": process.pid})
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the worker and its pool processes
            except ProcessLookupError:
                pass
            process.wait()
