"""Running one build under its lease: claim, heartbeat, pipeline, fenced finish."""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid

from app.builds import CreationState
from app.builds.leases import Lease, LeaseLost, claim_build, finish_build, release_build, renew_lease
from app.builds.states import SMOKE_TEST_REASON_LENGTH, SmokeTestResult
from app.context import ServiceContext
from app.database import session_scope
from workers.build_log import BuildLogWriter
from workers.builders import BuildFailed
from workers.pipeline import StepFailed, run_pipeline
from workers.scratch import remove_orphaned_scratch

log = logging.getLogger("mms.worker")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class StopReason(enum.StrEnum):
    """Why the heartbeat stops a build, and so what the worker records."""

    CANCELLED = "cancelled"  # finish as Cancelled
    LEASE_LOST = "lease lost"  # finish as Failed (fenced off: another attempt has it, or it ended)
    SHUTDOWN = "shutdown"  # hand it back to the queue


class BuildStopped(Exception):
    """The build was cancelled, or its lease was lost: stop at the next log line."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(reason)
        self.reason = StopReason(reason)  # also when unpickled, from its args


# Set when the worker is asked to stop (SIGTERM). A multiprocessing event, made before the
# pool forks, so the main process that receives the signal reaches the builds in its pool.
SHUTDOWN = multiprocessing.Event()


class Heartbeat(threading.Thread):
    """Renews the lease every third of its length; notices cancels, lost leases, and a
    shutdown whose grace period the build outlasted."""

    TICK = 0.5

    def __init__(self, context: ServiceContext, lease: Lease) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{lease.image_id}")
        self._context, self._lease = context, lease
        self._done = threading.Event()
        self.stop_reason: StopReason | None = None

    def run(self) -> None:
        settings = self._context.settings
        seconds = settings.build_lease_seconds
        next_renewal = time.monotonic() + seconds / 3
        draining_since: float | None = None
        while not self._done.wait(self.TICK):
            if SHUTDOWN.is_set():
                draining_since = draining_since or time.monotonic()
                if time.monotonic() - draining_since >= settings.build_shutdown_grace_seconds:
                    self.stop_reason = StopReason.SHUTDOWN
                    return
            if time.monotonic() < next_renewal:
                continue
            next_renewal = time.monotonic() + seconds / 3
            try:
                with session_scope(self._context.session_factory) as session:
                    if renew_lease(session, self._lease, lease_seconds=seconds):
                        self.stop_reason = StopReason.CANCELLED
            except LeaseLost:
                self.stop_reason = StopReason.LEASE_LOST
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
    if SHUTDOWN.is_set():  # stopping: leave it to another worker
        context.build_queue.publish_build(image_id)
        return
    with session_scope(context.session_factory) as session:
        lease = claim_build(
            session,
            parsed,
            owner=WORKER_ID,
            lease_seconds=settings.build_lease_seconds,
            max_attempts=settings.build_max_attempts,
        )
    if lease is None:
        log.info("worker.not_claimed", extra={"imageId": image_id})
        return
    log.info("worker.claimed", extra={"imageId": image_id, "attempt": lease.attempt})
    remove_orphaned_scratch()  # a worker killed mid-build (maybe this one's earlier attempt) left it
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
        outcome = {
            "image_location": result.image_location,
            "digest": result.digest,
            "size_bytes": result.size_bytes,
            "smoke_test": result.smoke_test,
            "smoke_test_reason": result.smoke_test_reason,
            "error": None,
        }
        writer(f"mms: Succeeded: {result.image_location}@{result.digest}")
    except BuildStopped as stopped:
        if stopped.reason is StopReason.SHUTDOWN:
            _hand_back(context, lease, writer, heartbeat)
            return
        if stopped.reason is StopReason.CANCELLED:
            state, outcome = CreationState.CANCELLED, {"error": "cancelled while building"}
        else:
            outcome = {"error": "the build lost its lease"}
        writer(f"mms: {outcome['error']}")
    except (StepFailed, BuildFailed) as failure:
        outcome = {"error": str(failure)[:1000]}
        if isinstance(failure, StepFailed) and failure.step == "smoke test":
            reason = failure.reason[:SMOKE_TEST_REASON_LENGTH]
            outcome |= {"smoke_test": SmokeTestResult.FAILED, "smoke_test_reason": reason}
        writer(f"mms: Failed at step {failure.step}: {outcome['error']}")
    except Exception as unexpected:  # a bug or an outage: the traceback is ours, the tenant gets its id
        error_id = uuid.uuid4().hex[:16]
        unexpected.add_note(f"error id {error_id}")  # in the traceback, so text logs show it too
        log.exception("worker.build_crashed", extra={"imageId": image_id, "errorId": error_id})
        outcome = {
            "error": f"the service hit an internal error (error id {error_id}); "
            "its operators can look it up in the worker's log"
        }
        writer(f"mms: Failed: {outcome['error']}")
    finally:
        heartbeat.stop()
        writer.flush()
    with session_scope(context.session_factory) as session:
        if not finish_build(session, lease, state=state, **outcome):
            log.warning("worker.fenced_off", extra={"imageId": image_id, "attempt": lease.attempt})
            return
    log.info("worker.finished", extra={"imageId": image_id, "state": state.value})


def _hand_back(context: ServiceContext, lease: Lease, writer: BuildLogWriter, heartbeat: Heartbeat) -> None:
    """The worker is stopping and the build outlasted the grace period: queue it again."""
    heartbeat.stop()
    grace = context.settings.build_shutdown_grace_seconds
    writer(
        f"mms: worker {WORKER_ID} is stopping; the build did not finish within {grace:g} s and goes back to the queue"
    )
    writer.flush()
    with session_scope(context.session_factory) as session:
        released = release_build(session, lease)
    if released:
        context.build_queue.publish_build(str(lease.image_id))
    log.info("worker.build_requeued", extra={"imageId": str(lease.image_id), "released": released})
