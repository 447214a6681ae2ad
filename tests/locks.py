"""Helpers for tests of what waits on a lock: work in another thread, and whether another
connection to the test database waits on one (PostgreSQL)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sqlalchemy import text

from app.context import ServiceContext


def waiting_on_a_lock(service_context: ServiceContext, seconds: float = 10.0) -> bool:
    """Whether another connection to this database waits on a lock (within ``seconds``)."""
    deadline = time.monotonic() + seconds
    with service_context.engine.connect() as watcher:
        while time.monotonic() < deadline:
            waiting = watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            )
            watcher.rollback()
            if waiting:
                return True
            time.sleep(0.05)
    return False


def in_thread(work: Callable[[], object], outcome: list[object]) -> threading.Thread:
    """Runs ``work`` in a daemon thread; what it returns or raises is appended to ``outcome``."""

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # noqa: BLE001  (reported by the test's thread)
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
