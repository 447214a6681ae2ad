"""Writing a build's log to the database as it grows, so the API can serve it live."""

from __future__ import annotations

import threading
import time
import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.database import session_scope
from app.orm import BuildLogChunk

# Attempts get disjoint sequence ranges, so a fenced-off worker never collides with its successor.
_SEQ_PER_ATTEMPT = 10_000_000
_FLUSH_SECONDS = 0.5
_FLUSH_BYTES = 64 * 1024


class BuildLogWriter:
    """Buffers lines and appends them as chunks, at least every half second."""

    def __init__(self, factory: sessionmaker[Session], image_id: uuid.UUID, attempt: int) -> None:
        self._factory = factory
        self._image_id = image_id
        self._attempt = attempt
        self._seq = attempt * _SEQ_PER_ATTEMPT
        self._lines: list[str] = []
        self._size = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        """Add one line (the builders' ``Log`` callable)."""
        with self._lock:
            self._lines.append(line.rstrip("\n") + "\n")
            self._size += len(line)
            due = self._size >= _FLUSH_BYTES or time.monotonic() - self._last_flush >= _FLUSH_SECONDS
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._lines:
                return
            text, self._lines, self._size = "".join(self._lines), [], 0
            self._seq += 1
            seq, self._last_flush = self._seq, time.monotonic()
        try:
            with session_scope(self._factory) as session:
                session.add(BuildLogChunk(image_id=self._image_id, seq=seq, attempt=self._attempt, text=text))
        except IntegrityError:
            pass  # the image was deleted meanwhile: nobody will read this log
