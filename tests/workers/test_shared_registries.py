"""The infra fixture's registries: the last test session out stops the ones a test session started."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from tests.embedded_service import free_port
from tests.infra import registry_pids, run_script, shared_registries
from tests.leftover_processes import is_running

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("docker-registry") is None,
    reason="scripts/infra/registry.sh needs root and Debian's docker-registry",
)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """registry.sh with a state folder and free ports of the test's own."""
    monkeypatch.setenv("MMS_REGISTRY_DIR", str(tmp_path))
    monkeypatch.setenv("MMS_REGISTRY_PORT", str(free_port()))
    monkeypatch.setenv("MMS_REGISTRY_AUTH_PORT", str(free_port()))
    yield tmp_path
    run_script("registry.sh", "--stop")  # whatever a failed test left


def _session() -> SimpleNamespace:
    """What shared_registries needs of a pytest config: a stash of its own, not this session's."""
    return SimpleNamespace(stash=pytest.Stash())


def test_the_session_that_started_the_registries_stops_them(state: Path) -> None:
    with shared_registries(_session()) as registries:
        pids = registry_pids()
        assert len(pids) == 2
        assert httpx.get(f"http://{registries['MMS_REGISTRY']}/v2/", timeout=5).status_code == 200
    assert not any(is_running(pid) for pid in pids)
    assert not (state / ".started-by-tests").exists()


def test_registries_another_session_still_uses_are_stopped_by_the_last_one_out(state: Path) -> None:
    with open(state / ".test-sessions", "a") as other:
        with shared_registries(_session()):
            pids = registry_pids()
            fcntl.flock(other, fcntl.LOCK_SH)  # another session joins, and ends last
        assert all(is_running(pid) for pid in pids)
        with shared_registries(_session()):  # that other session, as the infra fixture runs it
            assert registry_pids() == pids
            other.close()
    assert not any(is_running(pid) for pid in pids)


def test_registries_started_by_hand_are_left_running(state: Path) -> None:
    run_script("registry.sh", "--auth")
    pids = registry_pids()
    with shared_registries(_session()):
        assert registry_pids() == pids
    assert len(pids) == 2 and all(is_running(pid) for pid in pids)
