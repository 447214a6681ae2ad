"""Running one build under its lease: claim, heartbeat, pipeline, fenced finish."""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
import uuid

from app.context import ServiceContext
from app.database import session_scope
from app.orm import CreationState
from workers.build_log import BuildLogWriter
from workers.builders import BuildFailed
from workers.leases import Lease, LeaseLost, claim_build, finish_build, renew_lease
from workers.pipeline import StepFailed, run_pipeline

log = logging.getLogger("mms.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class BuildStopped(Exception):
    """The build was cancelled, or its lease was lost: stop at the next log line."""


class Heartbeat(threading.Thread):
    """Renews the lease every third of its length; notices cancels and lost leases."""

    def __init__(self, context: ServiceContext, lease: Lease) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{lease.image_id}")
        self._context, self._lease = context, lease
        self._done = threading.Event()
        self.stop_reason: str | None = None

    def run(self) -> None:
        seconds = self._context.settings.build_lease_seconds
        while not self._done.wait(seconds / 3):
            try:
                with session_scope(self._context.session_factory) as session:
                    if renew_lease(session, self._lease, lease_seconds=seconds):
                        self.stop_reason = "cancelled"
            except LeaseLost:
                self.stop_reason = "lease lost"
            except Exception:  # a database blip: try again at the next beat
                log.warning("worker.heartbeat_failed", exc_info=True)
            if self.stop_reason:
                return

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=10)


def run_build(context: ServiceContext, image_id: str) -> None:
    """Build the image if this worker can claim it; a duplicate delivery does nothing."""
    settings = context.settings
    try:
        parsed = uuid.UUID(image_id)
    except ValueError:
        log.warning("worker.bad_message")
        return
    with session_scope(context.session_factory) as session:
        lease = claim_build(
            session, parsed, owner=WORKER_ID,
            lease_seconds=settings.build_lease_seconds, max_attempts=settings.build_max_attempts,
        )
    if lease is None:
        log.info("worker.not_claimed", extra={"imageId": image_id})
        return
    log.info("worker.claimed", extra={"imageId": image_id, "attempt": lease.attempt})
    writer = BuildLogWriter(context.session_factory, parsed, lease.attempt)
    heartbeat = Heartbeat(context, lease)

    def emit(line: str) -> None:
        if heartbeat.stop_reason:
            raise BuildStopped(heartbeat.stop_reason)
        writer(line)

    heartbeat.start()
    writer(f"mms: build attempt {lease.attempt} on worker {WORKER_ID}")
    outcome: dict[str, object]
    state = CreationState.FAILED
    try:
        result = run_pipeline(context, parsed, emit)
        state = CreationState.SUCCEEDED
        outcome = {"image_location": result.image_location, "digest": result.digest,
                   "size_bytes": result.size_bytes, "error": None}
        writer(f"mms: Succeeded: {result.image_location}@{result.digest}")
    except BuildStopped as stopped:
        state = CreationState.CANCELLED if str(stopped) == "cancelled" else CreationState.FAILED
        outcome = {"error": "cancelled while building" if state is CreationState.CANCELLED else "the build lost its lease"}
        writer(f"mms: {outcome['error']}")
    except (StepFailed, BuildFailed) as failure:
        outcome = {"error": str(failure)[:1000]}
        writer(f"mms: Failed at step {failure.step}: {outcome['error']}")
    except Exception as unexpected:  # a bug or an outage: keep the traceback in the log
        writer("".join(traceback.format_exception(unexpected)))
        outcome = {"error": f"internal error: {type(unexpected).__name__}"}
        writer(f"mms: Failed: {outcome['error']}")
        log.exception("worker.build_crashed", extra={"imageId": image_id})
    finally:
        heartbeat.stop()
        writer.flush()
    with session_scope(context.session_factory) as session:
        if not finish_build(session, lease, state=state, **outcome):
            log.warning("worker.fenced_off", extra={"imageId": image_id, "attempt": lease.attempt})
            return
    log.info("worker.finished", extra={"imageId": image_id, "state": state.value})
