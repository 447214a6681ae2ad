"""The image's user for the oci builder: its line in the base's /etc/passwd and /etc/group.

Without a container run, the files are read from the base image's layers (a later layer's
file, or its whiteout, wins) and written anew, whole, in a layer of our own, with the user's
home and a sticky /tmp. Nothing depends on the worker: the same base gives the same bytes.
A base whose files are not plain files (a link) or are oversized keeps them as they are, and
the image runs as the bare number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from workers.build_context import RUN_GID, RUN_HOME, RUN_UID, RUN_USER
from workers.oci.layers import LayerBuilder
from workers.oci.python_env import Opener, scan_layer

__all__ = ["ACCOUNT_FILES", "BaseFile", "account_layer", "read_base_files"]

ACCOUNT_FILES = ("etc/passwd", "etc/group")
_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class BaseFile:
    """What the base holds at a path: its bytes, or None when it is there but no plain file."""

    data: bytes | None


def read_base_files(layers: Callable[[], Iterable[Opener]], paths: Iterable[str]) -> dict[str, BaseFile]:
    """The base image's files at ``paths`` (relative, ``etc/passwd``), as its layers leave them."""
    wanted = set(paths)
    found: dict[str, BaseFile] = {}
    for opener in layers():
        # A layer's whiteouts remove what the layers below it hold, never its own files.
        gone: list[str] = []
        added: dict[str, BaseFile] = {}
        with opener as layer:
            for tar, member in scan_layer(layer):
                name = member.name.removeprefix("./").strip("/")
                folder, _, base = name.rpartition("/")
                if base == ".wh..wh..opq":
                    gone.append(folder)
                elif base.startswith(".wh."):
                    gone.append(f"{folder}/{base[4:]}".lstrip("/"))
                elif name in wanted:
                    data = None
                    if member.isfile() and member.size <= _MAX_BYTES:
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    added[name] = BaseFile(data)
        for path in gone:
            found = {k: v for k, v in found.items() if k != path and not k.startswith(f"{path}/")}
        found.update(added)
    return found


def account_layer(files: dict[str, BaseFile]) -> tuple[LayerBuilder, bool]:
    """The layer that gives the image its user; and whether the user has a name in it."""
    builder = LayerBuilder()
    lines = {
        "etc/passwd": f"{RUN_USER}:x:{RUN_UID}:{RUN_GID}:scoring server:{RUN_HOME}:/usr/sbin/nologin",
        "etc/group": f"{RUN_USER}:x:{RUN_GID}:",
    }
    named = True
    for path, line in lines.items():
        current = files.get(path, BaseFile(b""))
        if current.data is None:
            named = named and path != "etc/passwd"
            continue
        data = _with_line(current.data, line.encode(), RUN_UID if path == "etc/passwd" else RUN_GID)
        if data is not None:
            builder.add_bytes(f"/{path}", data)
    builder.add_dir(RUN_HOME, mode=0o755, owner=RUN_UID)
    builder.add_dir("/tmp", mode=0o1777)
    return builder, named


def _with_line(data: bytes, line: bytes, number: int) -> bytes | None:
    """``data`` with ``line`` added, or None when it has the name or the number already."""
    for entry in data.splitlines():
        fields = entry.split(b":")
        if fields[0] == RUN_USER.encode() or (len(fields) > 2 and fields[2] == str(number).encode()):
            return None
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data + line + b"\n"
