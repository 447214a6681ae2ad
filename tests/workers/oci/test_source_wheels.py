"""Source-only packages: the sdist from the operator's index, its build backend contained,
its wheel cached under the sdist's digest (real bubblewrap, a real HTTP index on loopback)."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import packages
from workers.builders import BuildFailed
from workers.oci.python_env import build_source_wheels
from workers.sandbox import Limits

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="needs bubblewrap (scripts/bootstrap installs it)"
)

# A build backend as an attacker writes it: it reads what it can, and makes a wheel that
# carries what it found and says which sdist it came from.
BACKEND = """
import base64, hashlib, os, socket, zipfile

FOUND = []

def _try(what, fn):
    try:
        FOUND.append(f"ATTACK {what}: reached {fn()!r}"[:300])
    except Exception as exc:
        FOUND.append(f"ATTACK {what}: stopped ({type(exc).__name__})")

def _connect(port):
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    return "connected"

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _try("secret key", lambda: open(os.environ.get("MMS_DATA_DIR", "/nonexistent") + "/secret.key").read())
    _try("index port", lambda: _connect(INDEX_PORT))
    _try("worker cache", lambda: os.listdir(CACHE))
    name = "pyspark-3.5.9-py3-none-any.whl"
    files = {"pyspark/__init__.py": b"ORIGIN = 'MARK'\\n",
             "pyspark/attacks.txt": "\\n".join(FOUND).encode(),
             "pyspark-3.5.9.dist-info/METADATA": b"Metadata-Version: 2.1\\nName: pyspark\\nVersion: 3.5.9\\n",
             "pyspark-3.5.9.dist-info/WHEEL":
                 b"Wheel-Version: 1.0\\nGenerator: evil\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"}
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as whl:
        for path, data in files.items():
            whl.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append("pyspark-3.5.9.dist-info/RECORD,,")
        whl.writestr("pyspark-3.5.9.dist-info/RECORD", "\\n".join(record) + "\\n")
    return name
"""


def _sdist(mark: str, index_port: int, cache: Path) -> bytes:
    files = {
        "pyproject.toml": textwrap.dedent("""\
            [build-system]
            requires = []
            build-backend = "evil_backend"
            backend-path = ["."]
            """),
        "evil_backend.py": BACKEND.replace("MARK", mark)
        .replace("INDEX_PORT", str(index_port))
        .replace("CACHE", repr(str(cache))),
        "PKG-INFO": "Metadata-Version: 2.1\nName: pyspark\nVersion: 3.5.9\n",
    }
    return packages.sdist("pyspark-3.5.9", files)


@contextmanager
def index() -> Iterator[tuple[ThreadingHTTPServer, dict[str, bytes]]]:
    """A PEP 503 index on loopback serving whatever sdist ``files`` holds for pyspark."""
    files: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/simple/pyspark":
                links = "".join(
                    f'<a href="/files/{name}#sha256={hashlib.sha256(data).hexdigest()}">{name}</a>'
                    for name, data in files.items()
                )
                body, kind = f"<html><body>{links}</body></html>".encode(), "text/html"
            elif self.path.startswith("/files/") and self.path[7:] in files:
                body, kind = files[self.path[7:]], "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, files
    finally:
        server.shutdown()
        server.server_close()


def _origin(dest: Path, member: str = "pyspark/__init__.py") -> str:
    (wheel,) = dest.glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        return whl.read(member).decode()


def test_a_hostile_build_backend_runs_contained_and_cannot_poison_another_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "secret.key").write_text("the-workers-secret")
    monkeypatch.setenv("MMS_DATA_DIR", str(data_dir))
    cache = tmp_path / "cache" / "source-wheels"
    with index() as (server, files):
        port = server.server_address[1]
        url = f"http://127.0.0.1:{port}/simple"
        files["pyspark-3.5.9.tar.gz"] = _sdist("planted by account B", port, cache)
        log_b: list[str] = []
        build_source_wheels(
            ["pyspark==3.5.9"],
            tmp_path / "b" / "wheels",
            log_b.append,
            cache=cache,
            index_url=url,
            limits=Limits(wall_seconds=120),
        )
        text = "\n".join(log_b)
        assert "building its wheel contained" in text
        attacks = _origin(tmp_path / "b" / "wheels", "pyspark/attacks.txt").splitlines()
        assert len(attacks) == 3 and all("stopped" in line for line in attacks), attacks
        assert "the-workers-secret" not in text
        assert _origin(tmp_path / "b" / "wheels") == "ORIGIN = 'planted by account B'\n"

        # The same name and version with other bytes: a build of its own, never B's wheel.
        files["pyspark-3.5.9.tar.gz"] = _sdist("honest", port, cache)
        log_a: list[str] = []
        build_source_wheels(
            ["pyspark==3.5.9"],
            tmp_path / "a" / "wheels",
            log_a.append,
            cache=cache,
            index_url=url,
            limits=Limits(wall_seconds=120),
        )
        assert _origin(tmp_path / "a" / "wheels") == "ORIGIN = 'honest'\n"
        assert len(list(cache.iterdir())) == 2  # one entry per sdist digest

        # The same bytes again: the cached wheel, checked against its recorded digest.
        log_again: list[str] = []
        build_source_wheels(
            ["pyspark==3.5.9"], tmp_path / "again" / "wheels", log_again.append, cache=cache, index_url=url
        )
        assert any("wheel built before from pyspark-3.5.9.tar.gz" in line for line in log_again)
        assert not any("downloading" in line for line in log_again)  # known by the index's digest
        assert _origin(tmp_path / "again" / "wheels") == "ORIGIN = 'honest'\n"
        # A cached wheel changed on disk is not served.
        for wheel in cache.glob("*/*.whl"):
            wheel.write_bytes(b"tampered")
        log_tampered: list[str] = []
        build_source_wheels(
            ["pyspark==3.5.9"],
            tmp_path / "t" / "wheels",
            log_tampered.append,
            cache=cache,
            index_url=url,
            limits=Limits(wall_seconds=120),
        )
        assert any("building its wheel contained" in line for line in log_tampered)


def test_an_sdist_whose_digest_differs_from_the_index_is_refused(tmp_path: Path) -> None:
    with index() as (server, files):
        port = server.server_address[1]
        files["pyspark-3.5.9.tar.gz"] = _sdist("x", port, tmp_path)

        original = files["pyspark-3.5.9.tar.gz"]
        handler = server.RequestHandlerClass
        get = handler.do_GET

        def swap(self) -> None:
            if self.path.startswith("/files/"):
                files["pyspark-3.5.9.tar.gz"] = original + b"tail"
            get(self)
            files["pyspark-3.5.9.tar.gz"] = original

        handler.do_GET = swap  # the file served is not the one the index page names
        with pytest.raises(BuildFailed, match="cannot download the source of pyspark==3.5.9"):
            build_source_wheels(
                ["pyspark==3.5.9"],
                tmp_path / "w",
                lambda _: None,
                cache=tmp_path / "cache",
                index_url=f"http://127.0.0.1:{port}/simple",
            )


@pytest.mark.parametrize(
    "name",
    [
        'x-1.0-py3-none-any.whl ; python_version<"0"\n-f https:evil.example\n# .whl',
        "x-1.0-py3-none-any.whl#sha256=0",
        "not-a-wheel-name.whl",
    ],
)
def test_a_wheel_name_the_sandbox_chose_is_checked_before_use(tmp_path: Path, name: str) -> None:
    from workers.oci.python_env import _store_wheel

    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"PK")
    with pytest.raises(BuildFailed, match="invalid name|not one wheel"):
        _store_wheel(out, tmp_path / "cache" / "entry", 1 << 20)
    assert not (tmp_path / "cache" / "entry").exists()


def test_the_built_wheel_must_be_alone_and_small(tmp_path: Path) -> None:
    from workers.oci.python_env import _store_wheel

    out = tmp_path / "out"
    out.mkdir()
    (out / "x-1.0-py3-none-any.whl").write_bytes(b"P" * 2048)
    with pytest.raises(BuildFailed, match="larger than"):
        _store_wheel(out, tmp_path / "cache" / "entry", 1024)
    (out / "extra.txt").write_text("x")
    with pytest.raises(BuildFailed, match="not one wheel"):
        _store_wheel(out, tmp_path / "cache" / "entry", 1 << 20)
