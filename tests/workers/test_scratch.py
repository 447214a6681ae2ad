"""Build scratch folders: a worker starting removes those of dead processes on this host,
and nothing else (a live build's, another host's, files that are not scratch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from workers import scratch
from workers.scratch import remove_orphaned_scratch, scratch_dir


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait(timeout=30)
    return done.pid


def test_only_the_scratch_of_dead_processes_on_this_host_is_removed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scratch.tempfile, "tempdir", str(tmp_path))
    with scratch_dir("work") as live:
        (Path(live) / "model.bin").write_bytes(b"x")
        host = scratch._host()
        dead = tmp_path / f"mms-scratch-{host}-{_dead_pid()}-work-abc"
        (dead / "models").mkdir(parents=True)
        (dead / "models" / "weights").write_bytes(b"x" * 1024)
        elsewhere = tmp_path / f"mms-scratch-otherhost-{_dead_pid()}-work-abc"
        elsewhere.mkdir()
        unrelated = tmp_path / "mms-work-abc"  # not named by its owner: left alone
        unrelated.mkdir()

        assert remove_orphaned_scratch() == 1
        assert not dead.exists()
        assert Path(live, "model.bin").exists() and elsewhere.exists() and unrelated.exists()
    assert not Path(live).exists()
