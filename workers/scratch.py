"""Scratch folders of builds (downloads, layers, wheels), named after the process that made
them, so that a worker starting, and every build as it starts, removes those whose process
is gone: a build's own clean-up never runs when its worker is killed (kill -9, the OOM
killer), and what it fetched (models, dependency layers) can be gigabytes.

A folder is judged by its owner alone, never by age, since a build may run for an hour: the
owner's host name must be this host's and its process id must no longer exist.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

__all__ = ["remove_orphaned_scratch", "scratch_dir"]

log = logging.getLogger("mms.worker")
_PREFIX = "mms-scratch-"
_OWNED = re.compile(rf"{_PREFIX}(?P<host>[A-Za-z0-9_.]+)-(?P<pid>[0-9]+)-")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "_"


def scratch_dir(kind: str, *, directory: Path | None = None) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder (0700) for one build's files (``with scratch_dir("work") as path:``),
    in ``directory`` (default: the temporary folder), removed when the block ends, or by a
    worker or build starting later if this process dies first."""
    return tempfile.TemporaryDirectory(prefix=f"{_PREFIX}{_host()}-{os.getpid()}-{kind}-", dir=directory)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_orphaned_scratch(directory: Path | None = None) -> int:
    """Remove the scratch folders in ``directory`` (the temporary folder) whose process, on
    this host, is gone; return how many."""
    root = Path(directory or tempfile.gettempdir())
    host, removed = _host(), 0
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for entry in entries:
        owner = _OWNED.match(entry.name)
        if owner is None or owner["host"] != host or _alive(int(owner["pid"])):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # another worker starting may race us
            removed += 1
    if removed:
        log.info("worker.scratch_removed", extra={"count": removed, "directory": str(root)})
    return removed
