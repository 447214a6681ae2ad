"""The event hub's poller stops without abandoning a poll in flight."""

from __future__ import annotations

import asyncio
import threading
import time

from app.api.event_stream import EventHub


class _SlowHub(EventHub):
    """A hub whose read takes a while, on the poller's thread, as a slow query would."""

    def __init__(self) -> None:
        super().__init__(lambda: None, interval=0.01)  # type: ignore[arg-type, return-value]
        self.reading, self.read_done = threading.Event(), threading.Event()

    def _read(self, query):  # type: ignore[no-untyped-def]
        self.reading.set()
        time.sleep(0.5)
        self.read_done.set()
        return 0


def test_stopping_waits_for_the_poll_in_flight() -> None:
    # A poll abandoned mid-query hands its connection back after the engine is disposed of,
    # to a pool nobody closes: the connection then leaks.
    hub = _SlowHub()

    async def scenario() -> None:
        await hub.start()
        while not hub.reading.is_set():
            await asyncio.sleep(0.01)
        await hub.stop()
        assert hub.read_done.is_set(), "stop() returned while a poll was still reading"

    asyncio.run(scenario())


def test_a_stopped_hub_polls_no_more_and_can_start_again() -> None:
    hub = _SlowHub()

    async def scenario() -> None:
        await hub.start()
        while not hub.reading.is_set():
            await asyncio.sleep(0.01)
        await hub.stop()
        hub.reading.clear()
        await asyncio.sleep(0.1)
        assert not hub.reading.is_set()
        await hub.start()
        while not hub.reading.is_set():
            await asyncio.sleep(0.01)
        await hub.stop()

    asyncio.run(scenario())
