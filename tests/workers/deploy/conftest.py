"""Fixtures the deploy tests share."""

from __future__ import annotations

import pytest

from tests.infra import Infra
from tests.workers.deploy.netns_swarm import usable


@pytest.fixture(scope="module")
def swarm_tools(infra: Infra) -> None:
    """Skips a module's tests when a tenant swarm cannot be made here. Asked after ``infra``,
    which installs the engine: on a fresh machine there is no dockerd before it runs, and a
    check at collection skipped every tenant-swarm test there."""
    reason = usable()
    if reason is not None:
        pytest.skip(f"no tenant swarm here: {reason}")
