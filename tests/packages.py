"""Python package files made in a test: a wheel and a source distribution."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zipfile


def wheel(name: str, files: dict[str, str], version: str = "1.0") -> bytes:
    """A pure-Python wheel of ``files`` (path → text), with its metadata and RECORD."""
    info = f"{name}-{version}.dist-info"
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as whl:
        for path, data in contents.items():
            whl.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return buffer.getvalue()


def sdist(root: str, files: dict[str, str]) -> bytes:
    """A .tar.gz of ``files`` (path → text) under the folder ``root``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"{root}/{path}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()
