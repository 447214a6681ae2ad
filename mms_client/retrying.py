"""Another attempt after a transient HTTP failure: a dropped connection, a 5xx, a 429.

Attempts are bounded in number and in total time, spaced by an exponential backoff with
jitter (stamina, on tenacity), or by the server's ``Retry-After`` when it sends one. Only
requests that are safe to repeat are retried; each caller says which those are.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime

import stamina

__all__ = ["IDEMPOTENT_METHODS", "TRANSIENT_STATUSES", "Transient", "attempts", "retry_after", "transient_http"]

# 408 and 429 say "later"; 500, 502, 503, 504 are a proxy's or a restarting server's.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class Transient(Exception):
    """A failure worth another attempt; ``wait``: how long the server asked for, if it did."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


def transient_http(exc: Exception) -> bool:
    """No answer (connection refused or dropped, a timeout), or a ``Transient`` status."""
    import httpx

    return isinstance(exc, (httpx.TransportError, Transient))


def retry_after(value: str | None, *, cap: float = 60.0) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now, at most ``cap``."""
    if not value:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):  # not str.isdigit(): it takes '²', which float() refuses
        return min(float(value), cap)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(max(when - time.time(), 0.0), cap)


def attempts(
    on: Callable[[Exception], bool | float],
    *,
    tries: int = 4,
    timeout: float = 60.0,
    wait: float = 0.5,
    wait_max: float = 10.0,
) -> Iterator[stamina.Attempt]:
    """``for attempt in attempts(on): with attempt: ...`` — ``on(exc)`` says whether to try
    again: False, True (after the backoff) or the seconds to wait."""

    started = time.monotonic()

    def decide(exc: Exception) -> bool | float:
        verdict = on(exc)
        if verdict is True and isinstance(exc, Transient) and exc.wait is not None:
            verdict = exc.wait
        if verdict is not True and verdict is not False:
            # A wait that ends past the time budget is not waited for: fail now.
            return verdict if time.monotonic() - started + verdict < timeout else False
        return verdict

    return iter(
        stamina.retry_context(
            on=decide,
            attempts=max(1, tries),
            timeout=max(timeout, 0.001),
            wait_initial=wait,
            wait_max=wait_max,
            wait_jitter=wait,
        )
    )
