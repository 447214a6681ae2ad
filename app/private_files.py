"""The data folder is the service's alone: it is made 0700, its files 0600.

Secrets (``secret.key``) and the embedded SQLite files (database, broker) are created 0600
from the start; everything else written there later is private through the process umask
that the API processes and the build workers set when they start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.config import Settings

PRIVATE_UMASK = 0o077
_SQLITE_PREFIXES = ("sqlite:///", "sqla+sqlite:///")


def restrict_new_files() -> None:
    """Whatever this process creates from now on is readable by its own user only."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) made 0700 when created; an existing folder is left as is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_new_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 (never any other mode, even for an instant) and write ``data``;
    FileExistsError when it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def prepare_data_dir(settings: Settings) -> None:
    """The data folder, and the SQLite files the service opens, created private before first use
    (SQLite gives its -wal and -shm files the database file's mode)."""
    private_dir(settings.data_dir)
    for url in (settings.resolved_database_url, settings.resolved_broker_url):
        if not url.startswith(_SQLITE_PREFIXES):
            continue
        name = url.split(":///", 1)[1].split("?", 1)[0]
        path = Path(name)
        if name and name != ":memory:" and path.parent.is_dir():  # a missing folder stays an error
            try:
                write_new_private_file(path, b"")
            except FileExistsError:
                pass
