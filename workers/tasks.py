"""Celery tasks: thin, addressed by name, carrying ids only; the work lives in runner and reaper."""

from __future__ import annotations

import logging
import threading
import uuid
from functools import lru_cache

from app.builds.reaper import reap
from app.context import ServiceContext
from app.database import session_scope
from app.queue import BUILD_TASK
from app.services import idempotency
from app.services.image_store import collect_garbage
from workers.celery_app import (
    COLLECT_TASK,
    REAP_TASK,
    RECONCILE_TASK,
    SCHEDULE_TASK,
    SWEEP_TASK,
    celery_app,
    settings,
)
from workers.runner import run_build

log = logging.getLogger("mms.deploy")


@lru_cache
def worker_context() -> ServiceContext:
    return ServiceContext.build(settings)


# The reaper fails a build Running past its deadline; a build stuck in a loop that never logs
# (a hostile base's layers, say) would still hold the pool slot, so Celery kills its process
# a minute later (prefork pools) and the slot takes the next build.
@celery_app.task(name=BUILD_TASK, time_limit=settings.build_run_deadline_seconds + 60)
def build_image(image_id: str) -> None:
    """Build one image, if this worker can claim it."""
    run_build(worker_context(), image_id)


@celery_app.task(name=REAP_TASK)
def reap_builds() -> None:
    """Re-queue, fail or re-announce builds that stopped moving; forget expired Idempotency-Keys."""
    context = worker_context()
    with session_scope(context.session_factory) as session:
        to_publish = reap(session, context.settings)
        idempotency.forget_expired(session, ttl_seconds=context.settings.idempotency_ttl_seconds)
    for image_id in to_publish:
        context.build_queue.publish_build(image_id)


@celery_app.task(name=COLLECT_TASK)
def collect_image_garbage() -> None:
    """Untag deleted images and remove the embedded store's blobs that no tag reaches, past
    the grace period."""
    with session_scope(worker_context().session_factory) as session:
        collect_garbage(session, settings)


@celery_app.task(name=SCHEDULE_TASK, ignore_result=True)
def schedule_reconciles() -> None:
    """Hand each service whose next pass is due to a deploy worker."""
    from app.deployments.reconciler import HANDED_OUT_SECONDS, due_services

    with session_scope(worker_context().session_factory) as session:
        due = due_services(session)
    for service_id in due:
        reconcile_service.apply_async(args=[str(service_id)], expires=HANDED_OUT_SECONDS)


@celery_app.task(name=RECONCILE_TASK, ignore_result=True)
def reconcile_service(service_id: str) -> None:
    """One reconciler pass over one service (a no-op when another pass holds it)."""
    from workers.deploy.reconcile import reconcile_service as run_pass

    run_pass(worker_context(), uuid.UUID(service_id))


# One sweep at a time in a worker process: a sweep may take minutes (a tenant's cluster that
# answers slowly, up to SWEEP_SECONDS of tries and the last try's own bound), and the schedule
# sends one every minute; overlapping sweeps would each take a pass thread (workers.deploy.pass_slots).
_sweeping = threading.Lock()


@celery_app.task(name=SWEEP_TASK, ignore_result=True)
def sweep_services() -> None:
    """Remove what the engines and the deleted accounts' clusters hold of services that are gone
    (nothing when this process is sweeping already: the next sweep comes within a minute)."""
    from workers.deploy.reconcile import clean_up_deleted_accounts, sweep_orphans

    if not _sweeping.acquire(blocking=False):
        log.info("deploy.sweep_skipped")
        return
    try:
        try:
            sweep_orphans(worker_context())
        finally:  # an engine away does not hold up the clusters
            clean_up_deleted_accounts(worker_context())
    finally:
        _sweeping.release()
