"""A small HTTP/1.1 client for the gateway: one request to a replica, its reply read whole.

A replica runs the tenant's code, so its reply is hostile until read: ``h11`` parses it under
caps (headers ``MAX_HEADER_BYTES``, body ``max_response_bytes``, the whole exchange within the
service's scoring timeout). A reply that breaks one is ``BadReply`` (the gateway's 502) and
its connection is closed, never pooled. httpx would do the same at ~3 ms of CPU a request;
this costs a fraction of it (docs/design/web-services.md, "Gateway cost").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import h11

__all__ = ["BadReply", "Forwarder", "NoReplyInTime", "ReplicaUnreachable", "Reply", "Unforwardable"]

MAX_HEADER_BYTES = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 0.5
# Below uvicorn's keep-alive timeout (5 s), so the replica never closes a connection we are
# about to reuse; a replica that refused a connection is skipped for DOWN_SECONDS.
IDLE_SECONDS = 4.0
DOWN_SECONDS = 5.0
MAX_IDLE_PER_REPLICA = 32
MAX_INFORMATIONAL = 8  # 1xx replies before the real one: more is a replica stalling us
READ_CHUNK = 64 * 1024

Headers = Sequence[tuple[bytes, bytes]]


class ReplicaUnreachable(Exception):
    """The replica did not take the connection (refused, or not within the connect timeout):
    the request never reached it, so another replica may take it."""


class BadReply(Exception):
    """The replica's reply broke HTTP or a cap: the gateway answers 502. ``detail`` (for the
    log, never the caller) is what h11 said of it, which may quote the replica's bytes."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class NoReplyInTime(Exception):
    """The replica sent nothing within the scoring timeout: the gateway answers 504."""


class Unforwardable(Exception):
    """The caller's request cannot be written as HTTP/1.1 (h11 refused it): the gateway answers 400."""


class _Stale(Exception):
    """A connection closed before a byte of reply came back (a pooled one the replica let go)."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(
        default_factory=lambda: h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
    )
    idle_since: float = 0.0

    def drop(self) -> None:
        # abort, not close: nothing buffered for a hostile peer is worth waiting for.
        self.writer.transport.abort()

    def usable(self, now: float) -> bool:
        return (
            now - self.idle_since < IDLE_SECONDS and not self.reader.at_eof() and not self.writer.transport.is_closing()
        )


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Forwarder:
    """Pooled keep-alive connections to replicas (``host:port``), one event loop's."""

    def __init__(self, *, max_response_bytes: int) -> None:
        self.max_response_bytes = max_response_bytes
        self._idle: dict[str, list[_Connection]] = {}
        self._down_until: dict[str, float] = {}

    def is_down(self, address: str) -> bool:
        """Whether ``address`` refused a connection in the last DOWN_SECONDS."""
        until = self._down_until.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._down_until[address]
        return False

    async def forward(
        self, address: str, *, method: bytes, target: bytes, headers: Headers, body: bytes, timeout: float
    ) -> Reply:
        """Send one request to ``address`` and read its whole reply within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        connection, reused = self._pooled(address), True
        if connection is None:
            connection, reused = await self._connect(address), False
        request = h11.Request(
            method=method,
            target=target,
            headers=[(b"host", address.encode()), *headers, (b"content-length", str(len(body)).encode())],
        )
        try:
            try:
                reply = await self._exchange(connection, request, body, deadline)
            except _Stale:
                connection.drop()
                if not reused:
                    raise BadReply("the replica closed the connection without replying") from None
                # Almost always the replica letting an idle pooled connection go as we reused it
                # (no reply byte came back): once more, on a new connection.
                connection = await self._connect(address)
                try:
                    reply = await self._exchange(connection, request, body, deadline)
                except _Stale:
                    raise BadReply("the replica closed the connection without replying") from None
        except BaseException:
            connection.drop()
            raise
        self._release(address, connection)
        return reply

    async def aclose(self) -> None:
        """Close every pooled connection."""
        for connections in self._idle.values():
            for connection in connections:
                connection.drop()
        self._idle.clear()

    def _pooled(self, address: str) -> _Connection | None:
        connections = self._idle.get(address)
        now = time.monotonic()
        while connections:
            connection = connections.pop()
            if connection.usable(now):
                return connection
            connection.drop()
        return None

    async def _connect(self, address: str) -> _Connection:
        host, port = _split(address)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=READ_CHUNK), CONNECT_TIMEOUT_SECONDS
            )
        except (OSError, TimeoutError) as exc:
            self._down_until[address] = time.monotonic() + DOWN_SECONDS
            raise ReplicaUnreachable(f"{address}: {type(exc).__name__}: {exc}") from None
        return _Connection(reader, writer)

    def _release(self, address: str, connection: _Connection) -> None:
        protocol = connection.protocol
        trailing, closed = protocol.trailing_data
        reusable = protocol.our_state is h11.DONE and protocol.their_state is h11.DONE and not trailing and not closed
        connections = self._idle.setdefault(address, [])
        if not reusable or len(connections) >= MAX_IDLE_PER_REPLICA:
            connection.drop()
            return
        protocol.start_next_cycle()
        connection.idle_since = time.monotonic()
        connections.append(connection)

    async def _exchange(self, connection: _Connection, request: h11.Request, body: bytes, deadline: float) -> Reply:
        protocol = connection.protocol
        try:
            data = protocol.send(request) or b""
        except h11.LocalProtocolError as exc:
            raise Unforwardable(str(exc)) from None
        if body:
            data += protocol.send(h11.Data(data=body)) or b""
        data += protocol.send(h11.EndOfMessage()) or b""
        try:
            connection.writer.write(data)
            await asyncio.wait_for(connection.writer.drain(), _left(deadline))
        except TimeoutError:
            raise BadReply("the replica did not take the request within the scoring timeout") from None
        except OSError:
            raise _Stale from None
        return await self._read_reply(connection, deadline)

    async def _read_reply(self, connection: _Connection, deadline: float) -> Reply:
        protocol = connection.protocol
        received = False
        informational = 0
        response: h11.Response | None = None
        body = bytearray()
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                if not received:
                    raise _Stale from None
                raise BadReply(
                    f"the replica's reply is not HTTP/1.1, or its head is over {MAX_HEADER_BYTES} bytes",
                    detail=str(exc)[:200],
                ) from None
            if event is h11.NEED_DATA:
                try:
                    chunk = await asyncio.wait_for(connection.reader.read(READ_CHUNK), _left(deadline))
                except TimeoutError:
                    if not received:
                        raise NoReplyInTime from None
                    raise BadReply("the replica's reply did not end within the scoring timeout") from None
                except OSError:
                    if not received:
                        raise _Stale from None
                    raise BadReply("the replica's connection broke mid-reply") from None
                received = received or bool(chunk)
                protocol.receive_data(chunk)  # b"": the replica closed its side
            elif isinstance(event, h11.InformationalResponse):
                informational += 1
                if informational > MAX_INFORMATIONAL:
                    raise BadReply("the replica sent too many 1xx replies")
            elif isinstance(event, h11.Response):
                response = event
                declared = _content_length(event.headers)
                if declared is not None and declared > self.max_response_bytes:
                    raise BadReply(f"the replica's reply is larger than {self.max_response_bytes} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_response_bytes:
                    raise BadReply(f"the replica's reply is larger than {self.max_response_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return Reply(response.status_code, list(response.headers), bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                if not received:
                    raise _Stale
                raise BadReply("the replica closed the connection mid-reply")


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is digits
    return None
