"""The database gate: at most MMS_API_CONCURRENCY requests of a process past it at a time (the
rest queue on the event loop), and an upload takes a slot only once its body has arrived, so
slow clients never hold the process up."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.api.middleware import DatabaseRequestLimit, RequestSlots
from app.context import ServiceContext
from tests.factories import model_body
from tests.live_server import Live, live_service


def test_no_more_requests_than_the_slots_are_past_the_gate_and_the_rest_wait_their_turn() -> None:
    in_flight = peak = 0
    order: list[int] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        order.append(scope["n"])
        in_flight -= 1

    async def main() -> None:
        gate = DatabaseRequestLimit(app, RequestSlots(3))
        scopes = [{"type": "http", "method": "GET", "path": "/api/x", "n": n} for n in range(12)]
        await asyncio.gather(*(gate(scope, None, None) for scope in scopes))
        # An event stream and an upload's body pass freely (they hold no connection meanwhile).
        free = [{"type": "http", "method": m, "path": p, "n": 99} for m, p in (("GET", "/api/a/images/events"),)]
        free.append({"type": "http", "method": "POST", "path": "/api/a/assets", "n": 99})
        async with gate.slots.slot(), gate.slots.slot(), gate.slots.slot():  # the gate is full
            await asyncio.wait_for(asyncio.gather(*(gate(scope, None, None) for scope in free)), timeout=2)

    asyncio.run(main())
    assert peak == 3
    assert order[:12] == list(range(12))  # first come, first served


@pytest.fixture()
def live(service_context: ServiceContext, tmp_path: Path) -> Iterator[Live]:
    with live_service(service_context, tmp_path, api_concurrency=1) as live:
        yield live


def test_a_slow_upload_holds_no_slot_while_its_body_arrives(live: Live) -> None:
    account = live.account()
    path = httpx.URL(f"{account}/assets?name=slow.zip")
    with socket.create_connection(("127.0.0.1", path.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path.raw_path.decode()} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: {live.headers['Authorization']}\r\nContent-Type: application/zip\r\n"
            f"Content-Length: {10 * 1024 * 1024}\r\n\r\n".encode()
            + b"x" * 100_000
        )
        incoming = live.context.settings.uploads_dir
        deadline = time.monotonic() + 10
        while not list(incoming.glob(".upload-*")):  # the server is spooling the body
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        # The one slot is free: other requests of this process are answered meanwhile.
        started = time.monotonic()
        registered = httpx.post(f"{account}/models", json=model_body(), headers=live.headers, timeout=5)
        assert registered.status_code == 200
        assert httpx.get(f"{account}/models", headers=live.headers, timeout=5).status_code == 200
        assert time.monotonic() - started < 5
        # The upload still completes, taking the slot for its database work.
        sock.sendall(b"x" * (10 * 1024 * 1024 - 100_000))
        answer = sock.recv(65536).decode(errors="replace")
        deadline = time.monotonic() + 10
        while "\r\n\r\n" not in answer and time.monotonic() < deadline:
            answer += sock.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 201"), answer[:200]
