"""Safe extraction of user-supplied zip / tar / tar.gz archives for the build workers.

All checks are our own (tarfile's ``data`` filter had bypasses before Python 3.11.13):
only regular files and directories, relative paths without ``..``, no links or
devices, and caps on entry count and on bytes actually written. Extraction goes into
a fresh temp dir inside the destination and is moved into place only on success.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_TEMP_PREFIX = ".unpack-"


class UnpackError(Exception):
    """Extraction refused or failed; ``reason`` is a stable code, ``entry`` the offending name."""

    def __init__(self, reason: str, message: str, entry: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.entry = entry


@dataclass(frozen=True)
class UnpackLimits:
    """Caps against archive bombs."""

    max_total_bytes: int = 8 * 1024**3  # bytes written, summed over all files
    max_files: int = 10_000  # entries of any kind, directories included


@dataclass(frozen=True)
class UnpackResult:
    """What was extracted."""

    format: str  # "zip", "tar" or "tar.gz"
    files: int
    total_bytes: int


def detect_format(path: str | os.PathLike[str]) -> str | None:
    """Return "zip", "tar", "tar.gz" from the file's magic bytes, or None."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _is_tar_header(head):
        return "tar"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(512)  # only the first block: never inflate a bomb here
        except (OSError, EOFError, zlib.error):
            return None
        return "tar.gz" if _is_tar_header(inner) else None
    return None


def unpack_archive(
    archive_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    limits: UnpackLimits = UnpackLimits(),
) -> UnpackResult:
    """Safely extract a zip / tar / tar.gz into ``dest_dir``; on failure leave nothing behind."""
    archive, dest = Path(archive_path), Path(dest_dir)
    try:
        kind = detect_format(archive)
    except OSError as exc:
        raise UnpackError("io_error", f"{archive.name}: cannot read ({exc.strerror})") from None
    if kind is None:
        raise UnpackError("unsupported_format", f"{archive.name}: not a zip, tar or tar.gz archive")
    log.info("unpack.start archive=%s format=%s dest=%s", archive, kind, dest)
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=dest))
    except OSError as exc:
        raise UnpackError("io_error", f"cannot create {dest}: {exc.strerror}") from None
    try:
        writer = _Writer(tmp, limits)
        try:
            if kind == "zip":
                _extract_zip(archive, writer)
            else:
                _extract_tar(archive, writer, compressed=kind == "tar.gz")
        except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise UnpackError("corrupt", f"{archive.name}: corrupt archive ({exc})") from None
        except OSError as exc:
            raise UnpackError("io_error", f"{archive.name}: {exc}") from None
        _move_into_place(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        log.warning("unpack.failed archive=%s error=%s", archive, exc)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpack.done archive=%s files=%d bytes=%d", archive, writer.files, writer.total)
    return UnpackResult(kind, writer.files, writer.total)


def _is_tar_header(block: bytes) -> bool:
    # POSIX "ustar\x0000" and GNU "ustar  \x00" both start with "ustar" at offset 257.
    return len(block) >= 512 and block[257:262] == b"ustar"


def _safe_parts(name: str) -> tuple[str, ...]:
    """Split an entry name into safe relative components or raise ``UnpackError``."""
    if not name or "\x00" in name:
        raise UnpackError("unsafe_path", f"entry {name!r}: empty or NUL in name", name)
    if "\\" in name:
        raise UnpackError("unsafe_path", f"entry {name!r}: backslash in path", name)
    if name.startswith("/") or _DRIVE.match(name):
        raise UnpackError("unsafe_path", f"entry {name!r}: absolute path", name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnpackError("unsafe_path", f"entry {name!r}: '..' component", name)
    return parts


class _Writer:
    """Creates entries under the temp root, counting entries and bytes actually written."""

    def __init__(self, root: Path, limits: UnpackLimits) -> None:
        self.root, self.limits = root, limits
        self.files = 0
        self.total = 0

    def _target(self, name: str) -> Path | None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise UnpackError("too_many_files", f"more than {self.limits.max_files} entries (at {name!r})", name)
        parts = _safe_parts(name)
        return self.root.joinpath(*parts) if parts else None

    def directory(self, name: str) -> None:
        target = self._target(name)
        if target is not None:
            with _entry_errors(name):
                target.mkdir(parents=True, exist_ok=True)

    def file(self, name: str, opener: Callable[[], IO[bytes]], executable: bool) -> None:
        target = self._target(name)
        if target is None:
            raise UnpackError("unsafe_path", f"entry {name!r}: file without a name", name)
        with _entry_errors(name):
            target.parent.mkdir(parents=True, exist_ok=True)
            # "xb" = O_CREAT|O_EXCL: refuses duplicates and never follows a symlink.
            with opener() as src, open(target, "xb") as out:
                while chunk := src.read(_CHUNK):
                    self.total += len(chunk)
                    if self.total > self.limits.max_total_bytes:
                        raise UnpackError(
                            "too_large",
                            f"entry {name!r}: archive expands beyond {self.limits.max_total_bytes} bytes",
                            name,
                        )
                    out.write(chunk)
            target.chmod(0o755 if executable else 0o644)  # never setuid/sticky from archive


@contextmanager
def _entry_errors(name: str) -> Iterator[None]:
    try:
        yield
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        message = f"entry {name!r}: duplicate of, or clashes with, another entry"
        raise UnpackError("duplicate", message, name) from None
    except OSError as exc:
        raise UnpackError("io_error", f"entry {name!r}: {exc.strerror or exc}", name) from None


def _extract_zip(archive: Path, writer: _Writer) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = info.filename
            mode = info.external_attr >> 16  # unix st_mode, when the creator stored one
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise UnpackError("link", f"entry {name!r}: symbolic links are not allowed", name)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnpackError("special_file", f"entry {name!r}: device, fifo or socket", name)
            if info.flag_bits & 0x1:
                raise UnpackError("encrypted", f"entry {name!r}: encrypted, not supported", name)
            if info.is_dir() or kind == stat.S_IFDIR:
                writer.directory(name)
            else:
                writer.file(name, lambda i=info: zf.open(i), bool(mode & 0o111))


def _extract_tar(archive: Path, writer: _Writer, compressed: bool) -> None:
    # Streaming mode ("r|"): members are read in order, never all headers up front.
    with tarfile.open(archive, mode="r|gz" if compressed else "r|") as tf:
        for member in tf:
            name = member.name
            if member.issym() or member.islnk():
                raise UnpackError("link", f"entry {name!r}: links are not allowed", name)
            if member.isdir():
                writer.directory(name)
            elif member.isreg():
                opener = lambda m=member: tf.extractfile(m)
                writer.file(name, opener, bool(member.mode & 0o111))  # type: ignore[arg-type]
            elif member.ischr() or member.isblk() or member.isfifo():
                raise UnpackError("special_file", f"entry {name!r}: device or fifo", name)
            else:
                raise UnpackError("special_file", f"entry {name!r}: unsupported entry type", name)


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Move the extracted top-level entries from ``tmp`` into ``dest``, refusing clashes first."""
    names = sorted(os.listdir(tmp))
    for name in names:
        if os.path.lexists(dest / name):
            raise UnpackError("conflict", f"entry {name!r} already exists in destination", name)
    moved: list[str] = []
    try:
        for name in names:
            os.rename(tmp / name, dest / name)
            moved.append(name)
    except OSError as exc:
        for name in moved:  # put back what already moved, so the caller's rmtree gets it
            os.rename(dest / name, tmp / name)
        message = f"cannot move {name!r} into place: {exc.strerror}"
        raise UnpackError("io_error", message, name) from None
