"""Reproducible image layers: the same files give the same bytes, on any worker.

Entries are sorted, every parent folder is present, owners are 0:0 with no names, modes
are 0755 (folders and executables) or 0644 (but for a folder added with its own owner and
mode: the image user's home, /tmp), every timestamp is fixed, and the gzip header
carries no time and no file name. The layer's two digests (of the gzip blob, and of the
tar inside it, the config's ``diff_id``) are computed in the one pass that writes it.
Reproducible across workers as long as zlib's output for a level is, which holds for the
same zlib release (a different zlib can change the blob digest, never the diff_id).
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import struct
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Self

from workers.build_context import FIXED_MTIME, InvalidBuildSpec, walk_tree

__all__ = ["Layer", "LayerBuilder", "LayerStream", "compress_tar"]


@dataclass(frozen=True)
class Layer:
    """A finished layer blob on disk."""

    path: Path | None  # None: it was streamed, not kept
    digest: str  # sha256 of the gzip blob: the manifest's layer digest
    diff_id: str  # sha256 of the uncompressed tar: the config's rootfs.diff_ids entry
    size: int  # bytes of the gzip blob
    created_by: str  # its line in the image history


@dataclass(frozen=True)
class _Entry:
    source: Path | bytes | None  # None: a folder
    executable: bool = False
    mode: int | None = None  # a folder's own mode (None: 0755)
    owner: int = 0  # uid and gid
    link: str | None = None  # a symbolic link's target (source is None)


class _HashingWriter(io.RawIOBase):
    """Hashes and counts what passes through on its way to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.hash, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.hash.update(data)
        self.sink.write(data)
        self.size += len(data)
        return len(data)


class LayerBuilder:
    """Collect files under absolute image paths, then ``write`` them as one layer."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def add_bytes(self, image_path: str, data: bytes, *, executable: bool = False) -> None:
        self._put(image_path, _Entry(data, executable))

    def add_dir(self, image_path: str, *, mode: int = 0o755, owner: int = 0) -> None:
        """A folder with its own mode and owner (uid and gid), its parents as usual."""
        self._put(image_path, _Entry(None, mode=mode, owner=owner))

    def add_file(self, image_path: str, source: Path) -> None:
        self._put(image_path, _Entry(Path(source), bool(Path(source).stat().st_mode & 0o111)))

    def add_tree(self, root: Path, image_path: str) -> None:
        """A folder's regular files and folders (no links, no ``__pycache__``)."""
        self._put(image_path, _Entry(None))
        for path, rel in walk_tree(Path(root)):
            target = f"{image_path.rstrip('/')}/{rel}"
            if path.is_dir():
                self._put(target, _Entry(None))
            else:
                self.add_file(target, path)

    def add_symlink(self, image_path: str, target: str) -> None:
        self._put(image_path, _Entry(None, link=target))

    def add_prefix(self, root: Path, image_path: str) -> None:
        """An installed environment (a conda prefix): its files, folders and symbolic links,
        the links kept as links and never followed, so nothing outside ``root`` is read."""
        self._put(image_path, _Entry(None))
        base = image_path.rstrip("/")
        for entry in sorted(_scan_prefix(Path(root)), key=lambda e: e[1]):
            path, rel, kind = entry
            if kind == "link":
                self.add_symlink(f"{base}/{rel}", os.readlink(path))
            elif kind == "dir":
                self._put(f"{base}/{rel}", _Entry(None))
            else:
                self.add_file(f"{base}/{rel}", path)

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, image_path: str, entry: _Entry) -> None:
        path = PurePosixPath("/", image_path)
        if ".." in path.parts:
            raise InvalidBuildSpec(f"{image_path}: a layer path may not contain '..'")
        name = str(path)[1:]
        for parent in list(PurePosixPath(name).parents)[:-1]:
            self._entries.setdefault(str(parent), _Entry(None))
        self._entries[name] = entry

    def write(self, dest: Path, created_by: str, *, level: int = 6) -> Layer:
        """Write the layer to ``dest`` as a gzip tar at compression ``level``."""
        with dest.open("wb") as out:
            digest, diff_id, size = self._write_to(out, level)
        return Layer(dest, digest, diff_id, size, created_by)

    def diff_id(self) -> str:
        """The digest of the layer's tar, without compressing it (a cache key; cheap)."""
        tar_bytes = _HashingWriter(_Discard())
        self._write_tar(tar_bytes)
        return f"sha256:{tar_bytes.hash.hexdigest()}"

    def stream(self, created_by: str, *, level: int = 6) -> LayerStream:
        """The gzip blob as chunks while it is made, to upload as it compresses."""
        return LayerStream(self, created_by, level)

    def _write_to(self, out: BinaryIO, level: int) -> tuple[str, str, int]:
        compressed = _HashingWriter(out)
        with ParallelGzip(compressed, level) as gz:
            tar_bytes = _HashingWriter(gz)  # type: ignore[arg-type]
            self._write_tar(tar_bytes)
        return (f"sha256:{compressed.hash.hexdigest()}", f"sha256:{tar_bytes.hash.hexdigest()}", compressed.size)

    def _write_tar(self, sink: _HashingWriter) -> None:
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self._entries):
                _add(tar, name, self._entries[name])


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        return len(data)


class _QueueSink(io.RawIOBase):
    """Hands what is written to a bounded queue (the producer waits when the reader lags)."""

    def __init__(self, chunks: queue.Queue[bytes | BaseException | None], stop: threading.Event) -> None:
        self.chunks, self.stop = chunks, stop

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.stop.is_set():
            raise _ReaderGone()  # nobody reads on: stop compressing
        self.chunks.put(bytes(data))
        return len(data)


class _ReaderGone(Exception):
    pass


class LayerStream:
    """Iterate once for the gzip blob's chunks, made on a thread while they are consumed (so
    compressing overlaps uploading); then ``layer`` has its digests and size (no path)."""

    def __init__(self, builder: LayerBuilder, created_by: str, level: int) -> None:
        self._builder, self._created_by, self._level = builder, created_by, level
        self._layer: Layer | None = None
        self._started = False

    @property
    def layer(self) -> Layer:
        if self._layer is None:
            raise RuntimeError("the layer stream has not been read to its end")
        return self._layer

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("a layer stream can be read once")
        self._started = True
        chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=16)
        stop = threading.Event()
        result: list[tuple[str, str, int]] = []

        def produce() -> None:
            try:
                result.append(self._builder._write_to(_QueueSink(chunks, stop), self._level))  # type: ignore[arg-type]
                chunks.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                if not stop.is_set():
                    chunks.put(exc)

        producer = threading.Thread(target=produce, name="layer-stream", daemon=True)
        producer.start()
        try:
            while (item := chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():  # a reader that gave up: let the producer finish
                try:
                    chunks.get(timeout=0.1)
                except queue.Empty:
                    pass
            producer.join()
        digest, diff_id, size = result[0]
        self._layer = Layer(None, digest, diff_id, size, self._created_by)  # type: ignore[arg-type]


def compress_tar(src: Path, dest: Path, created_by: str, *, level: int = 6) -> Layer:
    """An existing tar file (a root file system) as a layer blob, its bytes kept as they are."""
    with src.open("rb") as tar_file, dest.open("wb") as out:
        compressed = _HashingWriter(out)
        with ParallelGzip(compressed, level) as gz:
            tar_bytes = _HashingWriter(gz)  # type: ignore[arg-type]
            while block := tar_file.read(ParallelGzip.BLOCK):
                tar_bytes.write(block)
    return Layer(
        dest,
        f"sha256:{compressed.hash.hexdigest()}",
        f"sha256:{tar_bytes.hash.hexdigest()}",
        compressed.size,
        created_by,
    )


class ParallelGzip:
    """A gzip writer that deflates 1 MiB blocks on several threads, as pigz does.

    Each block is deflated with the previous 32 KiB as its dictionary and ends on a sync
    flush, so the pieces join into one ordinary deflate stream; zlib releases the GIL, so a
    large model layer compresses on every core. The output depends only on the input and the
    level (and the zlib release), never on the thread count or timing: reproducible.
    """

    BLOCK = 1 << 20
    WINDOW = 32 << 10

    def __init__(self, sink: BinaryIO, level: int) -> None:
        self._sink, self._level = sink, level
        self._buffer = bytearray()
        self._previous_tail = b""
        self._crc, self._size = 0, 0
        workers = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gzip")
        self._pending: deque[Future[bytes]] = deque()
        self._max_pending = 2 * workers
        # The gzip header: no mtime, no file name, "unknown" OS: the same bytes anywhere.
        sink.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self.BLOCK:
            block = bytes(self._buffer[: self.BLOCK])
            del self._buffer[: self.BLOCK]
            self._submit(block, final=False)
        return len(data)

    def _submit(self, block: bytes, *, final: bool) -> None:
        self._crc = zlib.crc32(block, self._crc)
        self._size += len(block)
        self._pending.append(self._pool.submit(_deflate, block, self._previous_tail, self._level, final))
        self._previous_tail = block[-self.WINDOW :]
        while len(self._pending) > self._max_pending:
            self._sink.write(self._pending.popleft().result())

    def close(self) -> None:
        try:
            self._submit(bytes(self._buffer), final=True)
            while self._pending:
                self._sink.write(self._pending.popleft().result())
            self._sink.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _deflate(block: bytes, dictionary: bytes, level: int, final: bool) -> bytes:
    if dictionary:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, zdict=dictionary)
    else:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(block) + compressor.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


def _scan_prefix(root: Path, prefix: str = "") -> Iterator[tuple[Path, str, str]]:
    for entry in os.scandir(root):
        rel = f"{prefix}{entry.name}"
        if entry.is_symlink():
            yield Path(entry.path), rel, "link"
        elif entry.is_dir(follow_symlinks=False):
            yield Path(entry.path), rel, "dir"
            yield from _scan_prefix(Path(entry.path), f"{rel}/")
        elif entry.is_file(follow_symlinks=False):
            yield Path(entry.path), rel, "file"
        else:
            raise InvalidBuildSpec(f"{rel}: only regular files, folders and links can be built in")


def _add(tar: tarfile.TarFile, name: str, entry: _Entry) -> None:
    info = tarfile.TarInfo(name)
    info.mtime, info.uid, info.gid, info.uname, info.gname = FIXED_MTIME, entry.owner, entry.owner, "", ""
    if entry.link is not None:
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.link
        tar.addfile(info)
        return
    if entry.source is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755 if entry.mode is None else entry.mode
        tar.addfile(info)
        return
    info.mode = 0o755 if entry.executable else 0o644
    if isinstance(entry.source, bytes):
        info.size = len(entry.source)
        tar.addfile(info, io.BytesIO(entry.source))
        return
    with entry.source.open("rb") as f:
        info.size = os.fstat(f.fileno()).st_size
        tar.addfile(info, f)
