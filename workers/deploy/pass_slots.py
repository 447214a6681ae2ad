"""Which reconciler passes a deploy worker process runs at once.

A deploy worker runs its passes on a pool of threads (``mms worker --deploy``: at least
MIN_THREADS), and the schedule and sweep tasks run on the same threads. Most passes take a
second. A pass on a target a tenant attached (its swarm, its cluster) takes as long as the
tenant's engine makes it, up to PASS_SECONDS, or PULL_SECONDS when it pulls
(workers.deploy.swarm); a pass on the operator's targets that pulls a tenant's large image
takes a while too. So:

- a tenant (subscription: it makes any number of accounts) runs at most ``per_tenant`` passes;
- passes hold at most all threads but RESERVED_THREADS: the schedule and the sweep (one at a
  time: workers.tasks) always have a thread;
- passes on attached targets hold at most OPERATOR_THREADS fewer again: the operator's targets'
  passes always have threads; of those, one tenant holds at most half (at least one), so one
  slow tenant never holds them all.

A pass past a bound is put off: its lease is given back and its service waits in line in the
database (app.deployments.reconciler ``put_off``). The worker whose pass ends, in any process,
then takes the next one in line that it has room for (``room``, ``next_in_line``: of the freed
slot's kind first, then the tenant running the fewest passes of that kind, then the longest
waiting; workers.deploy.reconcile), and a waiting service is tried again on its own now and
then. Tenants slow at once beyond the attached share take turns in that line: more threads
widen it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from app.deployments.reconciler import Room

MIN_THREADS = 8  # a deploy worker's threads, whatever --concurrency asks (workers.cli)
RESERVED_THREADS = 2  # the schedule's and the sweep's
OPERATOR_THREADS = 2  # of the passes' threads, never taken by passes on attached targets


class Limits(NamedTuple):
    passes: int  # all passes at once
    attached: int  # passes on attached targets at once
    attached_per_tenant: int  # one tenant's of those (within the tenant's own share)


class PassSlots:
    def __init__(self, threads: int | None = None) -> None:
        # The worker's pass threads, set when the worker starts (None: the tenant's share is
        # the only bound, as when a pass is run outside a worker).
        self.threads = threads
        self._running: Counter[str] = Counter()
        self._attached: Counter[str] = Counter()
        self._lock = threading.Lock()

    def limits(self) -> Limits | None:
        if self.threads is None:
            return None
        passes = max(1, self.threads - RESERVED_THREADS)
        attached = max(1, passes - OPERATOR_THREADS)
        return Limits(passes, attached, max(1, attached // 2))

    @contextmanager
    def slot(self, tenant: str, *, attached: bool, per_tenant: int) -> Iterator[bool]:
        """Yields whether the pass may run now (and holds its slot until the block ends)."""
        with self._lock:
            free = self._running[tenant] < per_tenant
            limits = self.limits()
            if free and limits is not None:
                free = self._running.total() < limits.passes
                if attached:
                    free = (
                        free
                        and self._attached.total() < limits.attached
                        and self._attached[tenant] < limits.attached_per_tenant
                    )
            if free:
                self._running[tenant] += 1
                if attached:
                    self._attached[tenant] += 1
        try:
            yield free
        finally:
            if free:
                with self._lock:
                    _take_one(self._running, tenant)
                    if attached:
                        _take_one(self._attached, tenant)

    def room(self, *, per_tenant: int) -> Room | None:
        """What a pass could take now (None: no slot at all), for the next one in line."""
        with self._lock:
            limits = self.limits()
            full = frozenset(tenant for tenant, count in self._running.items() if count >= per_tenant)
            if limits is None:
                return Room(attached=True, full=full, attached_full=frozenset())
            if self._running.total() >= limits.passes:
                return None
            attached_full = frozenset(
                tenant for tenant, count in self._attached.items() if count >= limits.attached_per_tenant
            )
            return Room(attached=self._attached.total() < limits.attached, full=full, attached_full=attached_full)

    def running(self) -> dict[str, int]:
        """Each tenant's passes running now (those with none are not kept)."""
        with self._lock:
            return dict(self._running)


def _take_one(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


pass_slots = PassSlots()
