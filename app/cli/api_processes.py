"""Several API processes on one port, each accepting connections on a socket of its own.

uvicorn's ``--workers`` shares one listening socket: every process's event loop wakes on a new
connection and accepts all the pending ones it can, so a burst of keep-alive connections lands
mostly on whichever process woke first (measured: 22 and 10, 24 and 8 of 32 connections) and
the other one idles while they queue. Here each process listens on a socket of its own with
SO_REUSEPORT, and the kernel spreads new connections over the sockets by their addresses.

The parent only supervises: a process that dies is started again, waiting longer each time
it dies at once; one that fails to start before any process has served stops them all (a
broken app or port would fail each time); SIGTERM or SIGINT stops them all, gracefully.

Any process of the same user may join a SO_REUSEPORT group and take a share of the
connections (the kernel refuses other users): run the API as a user of its own (SECURITY.md).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from app.cli.supervisor import die_with_parent

log = logging.getLogger("mms.serve")

# uvicorn's exit status for a process that failed before it served (app, TLS or socket).
_STARTUP_FAILURE = 3
_STOP_SECONDS = 40.0  # past uvicorn's graceful shutdown (30 s)
_QUICK_EXIT_SECONDS = 10.0  # a process that dies sooner than this failed to start
_MAX_BACKOFF_SECONDS = 60.0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other sockets of this user may bind too (the
    address family chosen as uvicorn chooses it: IPv6 for an address with a colon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _serve_one(config: dict[str, Any], parent: int) -> None:
    import uvicorn

    die_with_parent()
    if os.getppid() != parent:  # the parent died before the kernel was told to stop this one with it
        return
    server = uvicorn.Server(uvicorn.Config(**config))
    host, port = server.config.host, server.config.port
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(_STARTUP_FAILURE) from None
    try:
        server.run(sockets=[sock])
    except SystemExit:
        if server.started:
            raise
    except Exception:
        if server.started:
            raise
        traceback.print_exc()  # why it could not start: the exit status below says only that
    if not server.started:
        raise SystemExit(_STARTUP_FAILURE)


def run_api_processes(count: int, config: dict[str, Any]) -> int:
    """Run ``count`` uvicorn servers made with ``uvicorn.Config(**config)`` until SIGTERM or
    SIGINT; returns the exit status for the command."""
    spawn = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    def start() -> multiprocessing.process.BaseProcess:
        process = spawn.Process(target=_serve_one, args=(config, os.getpid()), name="mms-api")
        process.start()
        return process

    processes: list[multiprocessing.process.BaseProcess | None] = [None] * count
    try:
        return _supervise(processes, start, stopping)
    finally:  # also when a start fails (out of processes or files): none outlives the command
        _stop_all([process for process in processes if process is not None])


def _supervise(
    processes: list[multiprocessing.process.BaseProcess | None],
    start: Callable[[], multiprocessing.process.BaseProcess],
    stopping: threading.Event,
) -> int:
    """Start a process in each slot and keep one there until ``stopping``; the exit status."""
    count = len(processes)
    for slot in range(count):
        processes[slot] = start()
    started = [time.monotonic()] * count
    backoff = [1.0] * count
    # A slot whose process died is empty until its restart is due: each slot waits on its own,
    # so one process backing off never delays the restart of another.
    due = [0.0] * count
    serving = False  # once one process has lived past a start, a failed start is not the app's fault
    while not stopping.wait(0.5):
        now = time.monotonic()
        for slot, process in enumerate(processes):
            if process is None:
                if now >= due[slot]:
                    processes[slot], started[slot] = start(), time.monotonic()
                continue
            if process.is_alive():
                serving = serving or now - started[slot] > _QUICK_EXIT_SECONDS
                continue
            if process.exitcode == _STARTUP_FAILURE and not serving:
                # The app or the port, before any process served: each restart would fail alike.
                log.error("api.start_failed", extra={"pid": process.pid})
                return 1
            # A restart that fails (the database away, say) waits longer each time, up to a minute.
            lived = now - started[slot]
            backoff[slot] = min(backoff[slot] * 2, _MAX_BACKOFF_SECONDS) if lived < _QUICK_EXIT_SECONDS else 1.0
            log.warning(
                "api.process_exited",
                extra={"pid": process.pid, "exitCode": process.exitcode, "restartInSeconds": backoff[slot]},
            )
            processes[slot], due[slot] = None, now + backoff[slot]
    return 0


def _stop_all(running: list[multiprocessing.process.BaseProcess]) -> None:
    """Gracefully (uvicorn's shutdown), then killed past _STOP_SECONDS."""
    for process in running:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_SECONDS
    for process in running:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
