"""A conda channel on local disk, as the tests need one (no public channel is reachable here):
``<channel>/<subdir>/repodata.json`` beside the packages, each a ``.tar.bz2`` holding
``info/index.json``, ``info/paths.json``, ``info/files`` and its files, as conda-build writes
them. Packages are the tests' own: a file's bytes, a symbolic link, a dependency."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

SUBDIRS = ("noarch", "linux-64")


def add_package(
    channel: Path,
    name: str,
    version: str,
    files: Mapping[str, bytes] = {},
    *,
    subdir: str = "linux-64",
    depends: Sequence[str] = (),
    links: Mapping[str, str] = {},
    noarch: str | None = None,
    build: str = "0",
) -> str:
    """Add a package to ``channel`` (its repodata too); its file name."""
    _index_files(channel)
    index = {"name": name, "version": version, "build": build, "build_number": 0, "depends": list(depends)}
    index["subdir"] = subdir
    if noarch:
        index["noarch"] = noarch
    paths = [
        {"_path": p, "path_type": "hardlink", "sha256": hashlib.sha256(d).hexdigest(), "size_in_bytes": len(d)}
        for p, d in files.items()
    ] + [{"_path": p, "path_type": "softlink"} for p in links]
    members: dict[str, bytes | str] = {
        "info/index.json": json.dumps(index).encode(),
        "info/paths.json": json.dumps({"paths": sorted(paths, key=lambda e: e["_path"]), "paths_version": 1}).encode(),
        "info/files": "".join(f"{p}\n" for p in sorted([*files, *links])).encode(),
        **files,
        **{p: f"->{target}" for p, target in links.items()},
    }
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for path, data in sorted(members.items()):
            info = tarfile.TarInfo(path)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data[2:]
                tar.addfile(info)
                continue
            info.size, info.mode = len(data), 0o755 if path.startswith("bin/") else 0o644
            tar.addfile(info, io.BytesIO(data))
    file_name = f"{name}-{version}-{build}.tar.bz2"
    (channel / subdir / file_name).write_bytes(bz2.compress(raw.getvalue()))
    _publish(channel, subdir, file_name, index)
    return file_name


def add_hostile_package(
    channel: Path,
    name: str,
    version: str,
    members: Iterable[tuple[tarfile.TarInfo, BinaryIO | None]],
    paths: Sequence[Mapping[str, object]],
    *,
    subdir: str = "linux-64",
) -> str:
    """A package written as an attacker would: any tar ``members`` (streamed, so a bomb of
    gigabytes costs no memory) and any ``paths.json`` entries; its file name."""
    _index_files(channel)
    index = {"name": name, "version": version, "build": "0", "build_number": 0, "depends": [], "subdir": subdir}
    info = {
        "info/index.json": json.dumps(index).encode(),
        "info/paths.json": json.dumps({"paths": list(paths), "paths_version": 1}).encode(),
    }
    file_name = f"{name}-{version}-0.tar.bz2"
    with bz2.BZ2File(channel / subdir / file_name, "wb") as packed, tarfile.open(fileobj=packed, mode="w|") as tar:
        for path, data in info.items():
            entry = tarfile.TarInfo(path)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
        for entry, body in members:
            tar.addfile(entry, body)
    _publish(channel, subdir, file_name, index)
    return file_name


class Zeros(io.RawIOBase):
    """``size`` zero bytes, made as they are read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _index_files(channel: Path) -> None:
    for sd in SUBDIRS:
        index_file = channel / sd / "repodata.json"
        if not index_file.exists():
            index_file.parent.mkdir(parents=True, exist_ok=True)
            index_file.write_text(json.dumps({"info": {"subdir": sd}, "packages": {}, "packages.conda": {}}))


def _publish(channel: Path, subdir: str, file_name: str, index: Mapping[str, object]) -> None:
    blob = (channel / subdir / file_name).read_bytes()
    index_file = channel / subdir / "repodata.json"
    repodata = json.loads(index_file.read_text())
    repodata["packages"][file_name] = {
        **index,
        "md5": hashlib.md5(blob).hexdigest(),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
        "timestamp": 1700000000000,
    }
    index_file.write_text(json.dumps(repodata))


def add_python(channel: Path, version: str, interpreter: str) -> None:
    """A ``python`` package whose bin/python<X.Y> is a link to ``interpreter`` (the base
    image's), with a pyvenv.cfg at the prefix's root: Python then takes the prefix as its
    own, with its site-packages under lib/python<X.Y>, as a real conda python's. The real
    conda-forge python (its own stdlib and libpython) is not reachable from here."""
    short = ".".join(version.split(".")[:2])
    home = interpreter.rpartition("/")[0]
    add_package(
        channel,
        "python",
        version,
        {
            "pyvenv.cfg": f"home = {home}\ninclude-system-site-packages = false\nversion = {version}\n".encode(),
            f"lib/python{short}/site-packages/README": b"conda's site-packages\n",
        },
        links={f"bin/python{short}": interpreter, "bin/python3": f"python{short}", "bin/python": f"python{short}"},
    )
