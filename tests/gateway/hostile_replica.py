"""A replica that answers scoring requests with hostile replies (or proper ones, counting its
connections), as a raw asyncio server on loopback in a thread of the test process. Every behaviour is bounded: at most
``MAX_BYTES`` written and ``MAX_SECONDS`` spent on a connection, whatever the gateway does."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

MAX_BYTES = 256 * 1024 * 1024
MAX_SECONDS = 10.0
DRIP_SECONDS = 0.1

# A behaviour answers one request; it returns True to keep the connection for the next one.
Behaviour = Callable[["HostileReplica", asyncio.StreamWriter], Awaitable[bool | None]]


async def _flood(replica: HostileReplica, writer: asyncio.StreamWriter, head: bytes, piece: bytes) -> None:
    await replica.write(writer, head)
    while replica.sent[writer] < MAX_BYTES:
        await replica.write(writer, piece)


async def huge_headers(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """A status line, then header lines without end."""
    await _flood(replica, writer, b"HTTP/1.1 200 OK\r\n", b"X-Filler: " + b"a" * 1000 + b"\r\n")


async def endless_chunked_body(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """Chunks of 64 KiB without a last one."""
    chunk = b"10000\r\n" + b"b" * 0x10000 + b"\r\n"
    await _flood(replica, writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk)


async def endless_body_until_close(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """No length: the body ends when the connection does, which is never."""
    await _flood(replica, writer, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"c" * 0x10000)


async def huge_declared_body(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """A Content-Length of 10 GB, and the bytes to go with it."""
    await _flood(replica, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\n\r\n", b"d" * 0x10000)


async def _drip(replica: HostileReplica, writer: asyncio.StreamWriter, head: bytes) -> None:
    await replica.write(writer, head)
    loop = asyncio.get_running_loop()
    end = loop.time() + MAX_SECONDS
    while loop.time() < end:
        await asyncio.sleep(DRIP_SECONDS)
        await replica.write(writer, b"e")


async def slow_headers(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """Slowloris: a header a byte at a time."""
    await _drip(replica, writer, b"HTTP/1.1 200 OK\r\nX-Slow: ")


async def slow_body(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """A small body a byte at a time."""
    await _drip(replica, writer, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")


async def not_http(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    await replica.write(writer, b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    await asyncio.sleep(MAX_SECONDS)


async def silent(replica: HostileReplica, writer: asyncio.StreamWriter) -> None:
    """Takes the request and never answers."""
    await asyncio.sleep(MAX_SECONDS)


async def well_behaved(replica: HostileReplica, writer: asyncio.StreamWriter) -> bool:
    """A proper reply, saying which connection and request it was; keeps the connection."""
    body = f'{{"connection": {replica.connections}, "request": {replica.requests}}}'.encode()
    await replica.write(writer, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
    await replica.write(writer, b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


async def hangs_up_after_replying(replica: HostileReplica, writer: asyncio.StreamWriter) -> bool:
    """A proper reply that says nothing of closing, then the connection closed."""
    await well_behaved(replica, writer)
    return False


class HostileReplica:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.requests = 0
        self.total_sent = 0
        self.sent: dict[asyncio.StreamWriter, int] = {}
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()  # raises once the gateway has dropped the connection
        self.sent[writer] += len(data)
        self.total_sent += len(data)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.sent[writer] = 0
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            keep = True
            while keep:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), MAX_SECONDS)
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                await asyncio.wait_for(reader.readexactly(length), MAX_SECONDS)
                self.requests += 1
                keep = bool(await asyncio.wait_for(self.behaviour(self, writer), MAX_SECONDS))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the gateway dropped us, as it should
        finally:
            del self.sent[writer]
            writer.transport.abort()
            self._tasks.discard(task)

    @contextmanager
    def running(self) -> Iterator[HostileReplica]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        server: asyncio.Server | None = None

        async def start() -> None:
            nonlocal server
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()

        async def shut_down() -> None:
            assert server is not None
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(start(), loop)
        assert started.wait(10)
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=15)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=15)
            loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
