"""The Celery application of the build workers: Redis (or the embedded SQLite broker) rings, the
database is the truth."""

from __future__ import annotations

import logging
import signal

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from app.config import get_settings
from app.private_files import restrict_new_files
from app.queue import BUILD_TASK
from workers.scratch import remove_orphaned_scratch

log = logging.getLogger("mms.worker")

REAP_TASK = "mms.reap_builds"
COLLECT_TASK = "mms.collect_image_garbage"
# The reconciler's (docs/design/web-services.md §3): on the deploy queue, never behind a build.
SCHEDULE_TASK = "mms.schedule_reconciles"
RECONCILE_TASK = "mms.reconcile_service"
SWEEP_TASK = "mms.sweep_services"

settings = get_settings()
# What a build worker's beat sends, and a deploy worker's (`mms worker --deploy`): each kind
# rings only its own queue, so a service with no deploy worker leaves no pile of messages.
BUILD_SCHEDULE = {
    "reap-builds": {"task": REAP_TASK, "schedule": max(5.0, settings.build_lease_seconds / 2)},
    "collect-image-garbage": {"task": COLLECT_TASK, "schedule": settings.image_gc_interval_seconds},
}
DEPLOY_SCHEDULE = {
    # Expiring: rings missed while no deploy worker listened are not all played back at once.
    "reconcile-services": {"task": SCHEDULE_TASK, "schedule": 1.0, "options": {"expires": 5}},
    "sweep-services": {"task": SWEEP_TASK, "schedule": 60.0, "options": {"expires": 60}},
}
celery_app = Celery("mms", broker=settings.resolved_broker_url, include=["workers.tasks"])
celery_app.conf.update(
    task_default_queue=settings.build_queue,
    # A build is acknowledged only when it ends, and a worker takes one at a time, so a
    # worker that dies mid-build leaves the message to be delivered again.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # Redis re-delivers an unacknowledged task after this long even while it still runs;
    # the lease makes that duplicate a no-op. (The embedded SQLite broker takes no options.)
    broker_transport_options=(
        {} if settings.is_embedded_broker else {"visibility_timeout": settings.build_run_deadline_seconds + 600}
    ),
    broker_connection_retry_on_startup=True,
    task_routes={task: {"queue": settings.build_queue} for task in (BUILD_TASK, REAP_TASK, COLLECT_TASK)}
    | {task: {"queue": settings.deploy_queue} for task in (SCHEDULE_TASK, RECONCILE_TASK, SWEEP_TASK)},
    beat_schedule=BUILD_SCHEDULE,
    worker_hijack_root_logger=False,
)


@worker_init.connect
def _private_files(**_: object) -> None:
    # Before the worker opens its broker or writes a file: the data folder's files are its alone.
    restrict_new_files()
    remove_orphaned_scratch()  # and again at each build: a worker may die while this one runs
    # A tenant swarm's unsealed TLS material, left by a deploy worker killed mid-pass.
    from workers.deploy.tenant_swarm import remove_orphaned_tls

    remove_orphaned_tls(settings.data_dir)


@worker_init.connect
def _pass_threads(sender: object, **_: object) -> None:
    # A deploy worker's passes leave threads to its schedule and sweep, and passes on attached
    # targets to the others (workers.deploy.pass_slots): the bounds are read off its thread pool.
    from celery.concurrency import get_implementation
    from celery.concurrency.thread import TaskPool

    from workers.deploy.pass_slots import pass_slots

    try:
        threads = issubclass(get_implementation(getattr(sender, "pool_cls", None)), TaskPool)
        concurrency = int(sender.concurrency)  # type: ignore[attr-defined]
    except (TypeError, ValueError, AttributeError, KeyError, ImportError):
        threads, concurrency = False, 0
    if not threads:
        return  # a build worker's processes: no passes run there
    pass_slots.threads = concurrency
    log.info("worker.pass_threads", extra={"threads": concurrency, "limits": pass_slots.limits()})


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # Forked pool processes must not share the parent's database connections.
    from workers.runner import SHUTDOWN
    from workers.tasks import worker_context

    worker_context.cache_clear()

    # A SIGTERM sent to the whole process group reaches the pool too: start draining, as the
    # main process does, rather than die mid-build. A second SIGTERM stops it at once.
    def drain(*_: object) -> None:
        SHUTDOWN.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, drain)


_dispatcher = None


@worker_ready.connect
def _start_webhook_dispatcher(**_: object) -> None:
    global _dispatcher
    from workers.tasks import worker_context
    from workers.webhooks import WebhookDispatcher

    _dispatcher = WebhookDispatcher(worker_context())
    _dispatcher.start()


@worker_shutting_down.connect
def _drain_builds(**_: object) -> None:
    # Running builds get build_shutdown_grace_seconds to finish, then go back to the queue.
    from workers.runner import SHUTDOWN

    SHUTDOWN.set()


@worker_shutdown.connect
def _stop_webhook_dispatcher(**_: object) -> None:
    if _dispatcher is not None:
        _dispatcher.stop()
