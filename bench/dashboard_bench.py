"""500 dashboards against the production setup: polling one image each every second, then
the same 500 as event-stream subscribers.

The service is `mms serve` (MMS_ENV=production, JSON access logs, --workers API processes)
on PostgreSQL. The dashboards run in one asyncio process of their own, over plain keep-alive
HTTP/1.1 connections, so that the load generator costs little of the machine's CPU.

Polling: each dashboard GETs its image once a second (random phase), as a browser would,
sending back the ETag it got (so an unchanged image is a 304). Latency is measured from the
moment the poll was due, so a server falling behind shows as latency (no coordinated
omission). The figure: requests/s, p50/p99/max latency, server CPU.

Streaming: the dashboards subscribe to the account's image events; a driver then creates
images at a steady pace; each event's delay is from the state change's commit time (its
`time` field) to its arrival at a dashboard.

    .venv/bin/python bench/dashboard_bench.py [--dashboards 500] [--duration 30] [--workers 2]

Every phase is bounded in time and count; everything started is stopped and dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from production import MODEL, cpu_seconds, production_service

REQUEST_TIMEOUT = 10.0  # a poll not answered by then counts as failed
COLD_START_LIMIT = 60.0  # the longest the bench waits for every dashboard's first answer
SETTLE_SECONDS = 5.0

MANIFEST = {
    "name": "bench-manifest",
    "driverProgram": "score",
    "modelIds": [],
    "assets": [{"id": "score", "url": "https://example.com/score.py", "mimeType": "application/x-python"}],
    "targetRuntime": {"runtimeType": "Python", "properties": {}},
}


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str]]:
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


@dataclass
class Polling:
    """What the pollers share: when to stop, who has had an answer, what they measured."""

    end: float
    answered: set[int] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)


async def _poller(index: int, port: int, path: str, token: str, start: float, polling: Polling) -> None:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    etag = None
    due = start + random.random()
    try:
        while due < polling.end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            conditional = f"If-None-Match: {etag}\r\n" if etag else ""
            request = (
                f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n{conditional}\r\n"
            ).encode()
            try:
                status, headers = await asyncio.wait_for(_request(reader, writer, request), REQUEST_TIMEOUT)
            except (TimeoutError, ConnectionError, IndexError, asyncio.IncompleteReadError):
                polling.statuses["failed"] = polling.statuses.get("failed", 0) + 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                due += 1.0
                continue
            polling.latencies.append(loop.time() - due)
            polling.statuses[str(status)] = polling.statuses.get(str(status), 0) + 1
            if status in (200, 304):
                polling.answered.add(index)
            etag = headers.get("etag", etag)
            due = max(due + 1.0, loop.time())  # a dashboard polls again a second after its last answer was due
    finally:
        writer.close()


async def _subscriber(
    port: int, path: str, token: str, ready: asyncio.Event, delays: list[float], stop: asyncio.Event
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    try:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # the response headers
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 1.0)
            except TimeoutError:
                continue
            if not line:
                return
            if line.startswith(b"event: ready"):
                ready.set()
            elif line.startswith(b'data: {"id"'):
                sent = datetime.fromisoformat(json.loads(line[6:])["time"]).timestamp()
                delays.append(time.time() - sent)
    finally:
        writer.close()


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] if len(values) > 1 else float("nan")


async def poll_phase(service, images: list[str], dashboards: int, duration: float) -> None:
    """Start every dashboard within one second (as after a restart), wait until each has had
    its first answer (the cold start), then measure ``duration`` seconds of steady polling."""
    loop = asyncio.get_running_loop()
    path_of = [f"/api{service.account.split('/api', 1)[1]}/images/{image}" for image in images]
    start = loop.time() + 1.0
    polling = Polling(end=start + COLD_START_LIMIT + duration)
    tasks = [
        asyncio.create_task(_poller(i, service.port, path_of[i % len(images)], service.token, start, polling))
        for i in range(dashboards)
    ]
    while len(polling.answered) < dashboards and loop.time() < start + COLD_START_LIMIT:
        await asyncio.sleep(0.05)
    cold_start = loop.time() - start
    await asyncio.sleep(SETTLE_SECONDS)  # let the polls the cold start held back drain
    cold = dict(polling.statuses)
    polling.end = loop.time() + duration
    polling.latencies.clear()
    polling.statuses.clear()
    cpu_server, cpu_client, wall = (
        cpu_seconds(service.server.pid),
        cpu_seconds(os.getpid(), descendants=False),
        time.monotonic(),
    )
    await asyncio.gather(*tasks)
    wall = time.monotonic() - wall
    server_cpu = (cpu_seconds(service.server.pid) - cpu_server) / wall
    client_cpu = (cpu_seconds(os.getpid(), descendants=False) - cpu_client) / wall
    latencies = polling.latencies
    print(f"polling: {dashboards} dashboards x 1/s, {len(images)} images, ETag/304")
    print(
        f"  cold start: {len(polling.answered)} of {dashboards} had their first answer within {cold_start:.1f} s "
        f"(statuses {dict(sorted(cold.items()))})"
    )
    print(
        f"  steady, {duration:.0f} s: {len(latencies) / wall:.0f} requests/s, "
        f"statuses {dict(sorted(polling.statuses.items()))}"
    )
    print(
        f"  latency p50 {_percentile(latencies, 50) * 1000:.1f} ms, p99 {_percentile(latencies, 99) * 1000:.1f} ms, "
        f"max {max(latencies) * 1000:.1f} ms"
    )
    print(f"  server CPU {server_cpu:.2f} cores, load generator CPU {client_cpu:.2f} cores")


async def stream_phase(service, dashboards: int, events: int, manifest_id: str) -> None:
    path = f"/api{service.account.split('/api', 1)[1]}/images/events"
    stop = asyncio.Event()
    delays: list[float] = []
    readies = [asyncio.Event() for _ in range(dashboards)]
    tasks = [
        asyncio.create_task(_subscriber(service.port, path, service.token, readies[i], delays, stop))
        for i in range(dashboards)
    ]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    cpu_server, wall = cpu_seconds(service.server.pid), time.monotonic()
    await asyncio.sleep(5)
    idle_cpu = (cpu_seconds(service.server.pid) - cpu_server) / (time.monotonic() - wall)
    cpu_server, wall = cpu_seconds(service.server.pid), time.monotonic()
    async with httpx.AsyncClient(headers=service.headers, timeout=30) as client:
        for _ in range(events):
            created = await client.post(
                f"{service.account}/images", json={"name": "streamed", "manifestId": manifest_id, "imageType": "Docker"}
            )
            created.raise_for_status()
            await asyncio.sleep(1.0)
    deadline = time.monotonic() + 15
    while len(delays) < dashboards * events and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    busy_cpu = (cpu_seconds(service.server.pid) - cpu_server) / (time.monotonic() - wall)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"streaming: {dashboards} subscribers, {events} state changes (1/s)")
    print(
        f"  delivered {len(delays)} of {dashboards * events} events; "
        f"delay p50 {_percentile(delays, 50) * 1000:.0f} ms, "
        f"p99 {_percentile(delays, 99) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
    )
    print(f"  server CPU {idle_cpu:.2f} cores with every subscriber idle, {busy_cpu:.2f} cores while events flow")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dashboards", type=int, default=500)
    parser.add_argument("--images", type=int, default=50, help="the dashboards poll these in turn")
    parser.add_argument("--duration", type=float, default=30)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="API processes")
    args = parser.parse_args()
    with production_service(args.workers) as service:
        headers = service.headers
        model = httpx.post(f"{service.account}/models", json=MODEL, headers=headers).json()
        manifest = httpx.post(
            f"{service.account}/manifests", json={**MANIFEST, "modelIds": [model["id"]]}, headers=headers
        )
        manifest.raise_for_status()
        manifest_id = manifest.json()["id"]
        images = [
            httpx.post(
                f"{service.account}/images",
                headers=headers,
                json={"name": f"polled-{i}", "manifestId": manifest_id, "imageType": "Docker"},
            ).json()["Id"]
            for i in range(args.images)
        ]
        print(f"{args.workers} API processes (MMS_ENV=production, JSON logs), PostgreSQL, {os.cpu_count()} cores")
        asyncio.run(poll_phase(service, images, args.dashboards, args.duration))
        asyncio.run(stream_phase(service, args.dashboards, args.events, manifest_id))


if __name__ == "__main__":
    main()
