"""Counting finished builds' durations as they end, for ``mms_build_duration_seconds``.

A move that ends a build (to Succeeded, Failed or Cancelled) adds the build to
``BuildDurationBucket``'s rows in its own transaction, so each build is counted once, by
whichever worker or reaper ended it, and the counts only grow: deleting images later takes
nothing away (Prometheus would read a fall as a counter reset). The API's /metrics reads the
rows (``app.metrics``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.orm import BuildDurationBucket

BUILD_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
INF = "+Inf"
_UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def bucket_bounds(seconds: float) -> list[str]:
    """The ``le`` labels a build of ``seconds`` counts in (Prometheus buckets are cumulative)."""
    return [str(bound) for bound in BUILD_BUCKETS if seconds <= bound] + [INF]


def count_finished(session: Session, builds: Iterable[Sequence[Any]]) -> None:
    """Add builds that just ended, each ``(builder, state, started_at, ended_at)``; a build
    that never started (cancelled or expired in the queue) has no duration and is left out."""
    totals: dict[tuple[str, str, str], tuple[int, float]] = {}
    for builder, state, started_at, ended_at in builds:
        if started_at is None or ended_at is None:
            continue
        seconds = max((ended_at - started_at).total_seconds(), 0.0)
        for le in bucket_bounds(seconds):
            count, total = totals.get((builder, str(state), le), (0, 0.0))
            totals[(builder, str(state), le)] = (count + 1, total + seconds)
    if not totals:
        return
    insert = _UPSERTS[session.get_bind().dialect.name]
    statement = insert(BuildDurationBucket).values(
        # One order for every writer, so two finishing transactions never lock rows crosswise.
        [
            {"builder": builder, "state": state, "le": le, "builds": count, "seconds": total}
            for (builder, state, le), (count, total) in sorted(totals.items())
        ]
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[BuildDurationBucket.builder, BuildDurationBucket.state, BuildDurationBucket.le],
            set_={
                "builds": BuildDurationBucket.builds + statement.excluded.builds,
                "seconds": BuildDurationBucket.seconds + statement.excluded.seconds,
            },
        )
    )
