"""A single scoring thread that runs calls in order and hands results back to the event loop.

``loop.run_in_executor`` with a one-thread ``ThreadPoolExecutor`` does the same job, but its
concurrent.futures plumbing (locks, chained futures) nearly halved requests/second in
bench/scoring_server_bench.py; a bare queue plus ``call_soon_threadsafe`` costs little more
than calling run() on the loop itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any


class ScoringThread:
    """Run submitted callables one at a time on a dedicated daemon thread."""

    def __init__(self, name: str = "score") -> None:
        self._queue: SimpleQueue = SimpleQueue()
        # Daemon: a run() stuck forever must not keep the process alive after shutdown.
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue ``fn(*args)``; the returned future resolves on the caller's event loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            loop, future, fn, args = self._queue.get()
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting request, never kills us
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop closed during shutdown; nobody is waiting
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled while queued or running (server shutting down)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
