"""Several API processes on one port, each accepting connections on a socket of its own.

uvicorn's ``--workers`` shares one listening socket: every process's event loop wakes on a new
connection and accepts all the pending ones it can, so a burst of keep-alive connections lands
mostly on whichever process woke first (measured: 22 and 10, 24 and 8 of 32 connections) and
the other one idles while they queue. Here each process listens on a socket of its own with
SO_REUSEPORT, and the kernel spreads new connections over the sockets by their addresses.

The parent only supervises: a process that dies is started again (a process that fails
before it serves stops them all, as a broken app or port would fail each time); SIGTERM or
SIGINT stops them all, gracefully.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from typing import Any

from app.cli.supervisor import die_with_parent

log = logging.getLogger("mms.serve")

# uvicorn's exit status for a process that failed before it served (app, TLS or socket).
_STARTUP_FAILURE = 3
_STOP_SECONDS = 40.0  # past uvicorn's graceful shutdown (30 s)


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` that other sockets of this user may bind too."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def _serve_one(config: dict[str, Any]) -> None:
    import uvicorn

    die_with_parent()
    server = uvicorn.Server(uvicorn.Config(**config))
    host, port = server.config.host, server.config.port
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        print(f"cannot listen on {host}:{port}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(_STARTUP_FAILURE) from None
    try:
        server.run(sockets=[sock])
    finally:
        if not server.started:  # the app, the port: each restart would fail the same way
            raise SystemExit(_STARTUP_FAILURE)


def run_api_processes(count: int, config: dict[str, Any]) -> int:
    """Run ``count`` uvicorn servers made with ``uvicorn.Config(**config)`` until SIGTERM or
    SIGINT; returns the exit status for the command."""
    spawn = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    def start() -> multiprocessing.process.BaseProcess:
        process = spawn.Process(target=_serve_one, args=(config,), name="mms-api")
        process.start()
        return process

    processes = [start() for _ in range(count)]
    status = 0
    while not stopping.wait(0.5):
        for slot, process in enumerate(processes):
            if process.is_alive():
                continue
            if process.exitcode == _STARTUP_FAILURE:
                log.error("api.start_failed", extra={"pid": process.pid})
                status = 1
                stopping.set()
                break
            log.warning("api.process_exited", extra={"pid": process.pid, "exitCode": process.exitcode})
            time.sleep(1)  # not a tight loop if it keeps dying
            processes[slot] = start()
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    return status
