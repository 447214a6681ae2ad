"""The doorbell: tell the build workers, by task name and image id only, that work is waiting.

The database is the truth; a lost message is re-sent by the reaper, a duplicate finds the
build's lease held and does nothing. Messages carry no URLs and no secrets.
"""

from __future__ import annotations

import logging
from functools import cached_property

from celery import Celery
from sqlalchemy import event
from sqlalchemy.orm import Session

log = logging.getLogger("mms.queue")

BUILD_TASK = "mms.build_image"
_PENDING = "mms.after_commit"


class BuildQueue:
    def __init__(self, broker_url: str, queue: str) -> None:
        self._broker_url = broker_url
        self._queue = queue

    @cached_property
    def _client(self) -> Celery:
        return Celery("mms-api", broker=self._broker_url, set_as_current=False)

    def ping(self, timeout: float = 2.0) -> None:
        """Raise unless the broker accepts a connection within ``timeout`` seconds."""
        with self._client.connection_for_write() as connection:
            connection.ensure_connection(max_retries=0, timeout=timeout)

    def publish_build(self, image_id: str) -> None:
        """Ring the bell for one build; a broker that is down is logged, not raised (the reaper re-sends)."""
        try:
            self._client.send_task(BUILD_TASK, args=[image_id], queue=self._queue, retry=False)
        except Exception:
            log.warning("queue.publish_failed", extra={"imageId": image_id}, exc_info=True)


def after_commit(session: Session, callback) -> None:  # type: ignore[no-untyped-def]
    """Run ``callback()`` once the session's transaction commits; never if it rolls back."""
    session.info.setdefault(_PENDING, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_pending(session: Session) -> None:
    for callback in session.info.pop(_PENDING, []):
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)
