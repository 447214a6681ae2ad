"""Which reconciler passes a deploy worker process runs at once.

A deploy worker runs its passes on a few threads (``mms worker --deploy``: at least 4), and the
schedule and sweep tasks run on the same threads. Most passes take a second. A pass on a target
a tenant attached (its swarm, its cluster) takes as long as the tenant's engine makes it, up to
PASS_SECONDS, or PULL_SECONDS when it pulls (workers.deploy.swarm). Two bounds keep slow tenants
from holding every thread:

- a tenant (subscription: it makes any number of accounts) runs at most ``per_tenant`` passes;
- passes on attached targets hold at most all threads but RESERVED_THREADS, so the operator's
  targets' passes and the schedule and sweep always have a thread; of those, one tenant holds at
  most half (at least one), so one slow tenant never holds them all.

A pass past a bound is put off: its lease is given back and it is tried again a little later
(workers.deploy.reconcile), by this worker or another with room.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

# Threads of a deploy worker never given to passes on attached targets.
RESERVED_THREADS = 2


class PassSlots:
    def __init__(self, threads: int | None = None) -> None:
        # The worker's pass threads, set when the worker starts (None: no bound on attached
        # targets' passes beyond the tenant's, as when a pass is run outside a worker).
        self.threads = threads
        self._running: Counter[str] = Counter()
        self._attached: Counter[str] = Counter()
        self._lock = threading.Lock()

    def attached_limits(self) -> tuple[int, int] | None:
        """(all tenants', one tenant's) passes on attached targets at once, if bounded."""
        if self.threads is None:
            return None
        total = max(1, self.threads - RESERVED_THREADS)
        return total, max(1, total // 2)

    @contextmanager
    def slot(self, tenant: str, *, attached: bool, per_tenant: int) -> Iterator[bool]:
        """Yields whether the pass may run now (and holds its slot until the block ends)."""
        with self._lock:
            free = self._running[tenant] < per_tenant
            limits = self.attached_limits() if attached else None
            if free and limits is not None:
                total, one_tenant = limits
                free = self._attached.total() < total and self._attached[tenant] < one_tenant
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

    def running(self) -> dict[str, int]:
        """Each tenant's passes running now (those with none are not kept)."""
        with self._lock:
            return dict(self._running)


def _take_one(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


pass_slots = PassSlots()
