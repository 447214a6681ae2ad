"""Facts read from a base image's layers (its users, its Python, its Java) are cached on the
worker, but a base's layers are read as they stream, before their digests are checked: a
tenant's base that names another image's config with layers of its own must never answer
for another build's base. The cache is per account and keyed by every layer's digest."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import tarfile
import types
from collections.abc import Iterator
from pathlib import Path

from workers.builders.oci import OciBuilder
from workers.oci.media import OCI_LAYER

PUBLIC_CONFIG = "sha256:" + "ab" * 32  # say, python:3.11-slim's config


def _layer(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


class _Source:
    """A registry that serves whatever bytes it likes for a digest (as a hostile one does)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    @contextlib.contextmanager
    def open_blob(self, repository: str, digest: str) -> Iterator[Iterator[bytes]]:
        yield iter([self.blobs[digest]])


def _base(layer_digest: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        body={"config": {"digest": PUBLIC_CONFIG}, "layers": [{"digest": layer_digest, "mediaType": OCI_LAYER}]}
    )


def _etc(builder: OciBuilder, account: str, base: types.SimpleNamespace, source: _Source) -> dict[str, bytes]:
    builder._cache_scope = hashlib.sha256(account.encode()).hexdigest()[:16]  # as build_and_push sets it
    ref = types.SimpleNamespace(repository=f"{account}/img")
    layer = builder._account_layer(base, {}, source, ref, lambda _: None)
    out = io.BytesIO()
    for chunk in layer.stream("test", level=1):
        out.write(chunk)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(out.getvalue()))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and m.name.startswith("etc/")}


def test_one_accounts_base_never_plants_users_in_anothers_image(tmp_path: Path) -> None:
    builder = OciBuilder("localhost:5000", cache_dir=tmp_path / "cache")
    evil = _layer({"etc/passwd": b"root::0:0:root:/root:/bin/sh\n", "etc/group": b"root:x:0:scoring\n"})
    good = _layer({"etc/passwd": b"root:x:0:0:root:/root:/bin/bash\n", "etc/group": b"root:x:0:\n"})

    planted = _etc(builder, "attacker", _base("sha256:" + "e" * 64), _Source({"sha256:" + "e" * 64: evil}))
    assert planted["etc/passwd"].startswith(b"root::0:0:")  # the attacker's own image, as it asked

    # Another account, the real base (same config): its own files, not the cached ones.
    victim = _etc(builder, "victim", _base("sha256:" + "d" * 64), _Source({"sha256:" + "d" * 64: good}))
    assert victim["etc/passwd"].startswith(b"root:x:0:0:root:/root:/bin/bash\n"), victim
    assert b"root::0:0" not in victim["etc/passwd"] and victim["etc/group"].startswith(b"root:x:0:\n")

    # Even the same digests in another account are read again, not taken from the cache.
    again = _etc(builder, "victim2", _base("sha256:" + "e" * 64), _Source({"sha256:" + "e" * 64: good}))
    assert again["etc/passwd"].startswith(b"root:x:0:0:root:/root:/bin/bash\n")
