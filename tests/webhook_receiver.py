"""A webhook receiver for tests: answers with the statuses it is given, then 200, and keeps
every request it got (when, headers, body).

Given ``secrets``, it verifies each request as a Standard Webhooks receiver does
(``standardwebhooks.Webhook(secret).verify(body, headers)``), answers 401 when no secret
verifies it, and notes which of its secrets did."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Receiver:
    port: int
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    secrets: list[str | bytes] = field(default_factory=list)
    verified_with: list[list[str | bytes]] = field(default_factory=list)  # per request, when secrets are set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/mms"

    def states(self, image_id: str) -> list[str]:
        """The CreationStates received for one image, in event order: ids are opaque tokens,
        and one image's events are each their own transaction, one after the other, so their
        times order them (a retried delivery, the same id, counts once)."""
        unique = {e["id"]: e for e in (json.loads(body) for _, _, body in self.received)}
        events = sorted(unique.values(), key=lambda e: datetime.fromisoformat(e["time"]))
        return [e["image"]["CreationState"] for e in events if e["image"]["Id"] == image_id]

    def verifying(self, headers: dict[str, str], body: bytes) -> list[str | bytes]:
        """The secrets that verify a request."""
        return [secret for secret in self.secrets if verifies(secret, headers, body)]


def verifies(secret: str | bytes, headers: dict[str, str], body: bytes) -> bool:
    """Whether a Standard Webhooks receiver holding ``secret`` takes the request."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


@contextmanager
def receiving(port: int) -> Iterator[Receiver]:
    state = Receiver(port)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = dict(self.headers)
            state.received.append((time.monotonic(), headers, body))
            status = state.statuses.pop(0) if state.statuses else 200
            if state.secrets:
                state.verified_with.append(state.verifying(headers, body))
                status = status if state.verified_with[-1] else 401
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
