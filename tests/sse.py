"""A small Server-Sent Events reader for tests: frames from a streaming httpx response."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


@dataclass
class Frame:
    event: str
    id: str | None
    data: str


def frames(response: httpx.Response) -> Iterator[Frame]:
    """Parse frames as they arrive (comments and retry lines are skipped)."""
    event, event_id, data = "message", None, []
    for line in response.iter_lines():
        if not line:
            if data or event != "message":
                yield Frame(event, event_id, "\n".join(data))
            event, event_id, data = "message", None, []
        elif line.startswith((":", "retry:")):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


class Listener:
    """Reads a stream on a thread; ``next()`` waits for the next frame."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.frames: queue.Queue[Frame | None] = queue.Queue()
        self.status: int | None = None
        self.broken: httpx.HTTPError | None = None  # how the stream broke, if it did not end
        self._response: httpx.Response | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(10, read=None))
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, headers), daemon=True)
        self._thread.start()
        assert self._started.wait(10), "the stream did not answer"

    def _run(self, url: str, headers: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                self.status = response.status_code
                self._response = response
                self._started.set()
                if response.status_code == 200:
                    for frame in frames(response):
                        self.frames.put(frame)
        except httpx.HTTPError as exc:
            self.broken = exc  # e.g. the body cut off mid-chunk, rather than ended
        finally:
            self._started.set()
            self.frames.put(None)  # the stream ended

    def next(self, timeout: float = 10) -> Frame | None:
        return self.frames.get(timeout=timeout)

    def close(self) -> None:
        if self._response is not None:
            # Shut the socket: that wakes the reading thread, and the server sees the disconnect.
            stream = self._response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._client.close()
