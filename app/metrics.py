"""Prometheus metrics.

Request latency is measured in each API process; with several processes (``mms serve
--workers N``) prometheus_client's multiprocess mode adds them up, so any process answers
for all. Build and webhook figures are read from the database at scrape time, so every API
replica on every machine reports the same numbers for the whole fleet of workers. Build
durations are counted by the move that ends each build, wherever it runs, into a table the
API reads (``app.builds.durations``): a histogram that only grows, whatever is deleted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.builds.durations import BUILD_BUCKETS, INF
from app.builds.states import CreationState
from app.database import session_scope
from app.orm import BuildDurationBucket, DeliveryState, Image, WebhookDelivery

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client itself

REQUEST_SECONDS = Histogram(
    "mms_http_request_duration_seconds",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    REQUEST_SECONDS.labels(method, route, str(status)).observe(seconds)


class DatabaseCollector(Collector):
    """Builds by state, the queue's depth, build durations and webhook deliveries, from the
    database; cached a few seconds so that several scrapers cost one set of queries."""

    def __init__(self, session_factory: Callable[[], Session], *, cache_seconds: float = 5.0) -> None:
        self._session_factory = session_factory
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self._cache_seconds:
                self._cached = (time.monotonic(), self._read())
            return list(self._cached[1])

    def _read(self) -> list[Metric]:
        with session_scope(self._session_factory) as session:
            by_state = dict(session.execute(select(Image.state, func.count()).group_by(Image.state)).all())
            deliveries = dict(
                session.execute(select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state)).all()
            )
            durations = self._durations(session)
        builds = GaugeMetricFamily("mms_builds", "Image builds the database holds, by CreationState", labels=["state"])
        for state in CreationState:
            builds.add_metric([state.value], by_state.get(state.value, 0))
        queue = GaugeMetricFamily(
            "mms_build_queue_depth",
            "Builds waiting for a worker (NotStarted)",
            value=by_state.get(CreationState.NOT_STARTED.value, 0),
        )
        hooks = GaugeMetricFamily("mms_webhook_deliveries", "Webhook deliveries by state", labels=["state"])
        for state in DeliveryState:
            hooks.add_metric([state.value], deliveries.get(state.value, 0))
        return [builds, queue, durations, hooks]

    def _durations(self, session: Session) -> HistogramMetricFamily:
        counted: dict[tuple[str, str], dict[str, tuple[int, float]]] = {}
        for row in session.execute(select(BuildDurationBucket)).scalars():
            counted.setdefault((row.builder, row.state), {})[row.le] = (row.builds, row.seconds)
        family = HistogramMetricFamily(
            "mms_build_duration_seconds",
            "Finished builds from start to end, by builder and final state, counted as they end",
            labels=["builder", "state"],
        )
        for (builder, state), by_le in sorted(counted.items()):
            count, total = by_le.get(INF, (0, 0.0))
            buckets = [(str(bound), by_le.get(str(bound), (0, 0.0))[0]) for bound in BUILD_BUCKETS]
            family.add_metric([builder, state], buckets + [(INF, count)], total)
        return family


def render(database: DatabaseCollector) -> tuple[bytes, str]:
    """The metrics page: this process's (or all API processes') requests, then the database's figures."""
    if os.environ.get(MULTIPROCESS_ENV):
        processes = CollectorRegistry()
        MultiProcessCollector(processes)
        requests = generate_latest(processes)
    else:
        requests = generate_latest(REGISTRY)
    figures = CollectorRegistry()
    figures.register(database)
    return requests + generate_latest(figures), CONTENT_TYPE_LATEST
