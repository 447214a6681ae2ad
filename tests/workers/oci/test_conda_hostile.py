"""Conda packages as an attacker writes them (issue 15): every archive is downloaded by the
fetcher and checked against its record, and unpacked and linked in the sandbox, so a bomb
stops at a named limit, a path or link that leaves the prefix lands nowhere on the worker, the
install reads none of the worker's files, a lying index is caught naming the package, and a
channel host that moves to a private address between the solve and the download is refused.
Real rattler and bubblewrap, against a channel the test writes."""

from __future__ import annotations

import gzip
import hashlib
import io
import secrets
import socket
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.workers.conda_channel import Zeros, add_hostile_package, add_package
from workers.builders import BuildFailed
from workers.fetcher import FetchPolicy
from workers.oci.conda_env import CondaEnv, conda_specs, install_conda_env
from workers.sandbox import Limits

MiB = 1 << 20
PUBLIC_IP = "93.184.216.34"  # only ever answered by the test's resolver, never connected to


def _install(
    channel: str, text: str, work: Path, *, limits: Limits = Limits(), lines: list[str] | None = None, **kw
) -> CondaEnv:
    return install_conda_env(
        text,
        conda_specs(text, "3.11.7"),
        channels=[f"local={channel}"],
        subdir="linux-64",
        glibc="2.36",
        work=work,
        cache_dir=work.parent / "cache",
        emit=(lines if lines is not None else []).append,
        limits=limits,
        **kw,
    )


def _file(name: str, size: int) -> tuple[tarfile.TarInfo, io.RawIOBase]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info, Zeros(size)


def _entry(path: str, size: int = 0, **kw: object) -> dict[str, object]:
    return {"_path": path, "path_type": "hardlink", "sha256": "0" * 64, "size_in_bytes": size, **kw}


def _layer_bytes(env: CondaEnv, folder: Path) -> dict[str, tarfile.TarInfo | bytes]:
    layer = env.layer.write(folder / "conda.tar.gz", "conda")
    found: dict[str, tarfile.TarInfo | bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.path.read_bytes()))) as tar:  # type: ignore[union-attr]
        for member in tar.getmembers():
            found[member.name] = tar.extractfile(member).read() if member.isfile() else member  # type: ignore[union-attr]
    return found


def _disk_use(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize(
    ("members", "limits", "expected"),
    [
        # One file of 96 MiB of zeros (a few hundred bytes packed), past a 32 MiB file limit.
        (
            [_file("share/zeros", 96 * MiB)],
            Limits(file_bytes=32 * MiB, disk_bytes=256 * MiB),
            "conda: installing bomb==1.0=0 wrote a file past the file size limit of 32 MiB",
        ),
        # Twelve files of 8 MiB: each within the file limit, together past a 48 MiB disk.
        (
            [_file(f"share/part{i}", 8 * MiB) for i in range(12)],
            Limits(file_bytes=32 * MiB, disk_bytes=48 * MiB),
            "conda: installing bomb==1.0=0 went past the disk limit of 48 MiB",
        ),
        # Many empty files: no bytes at all, past the limit of files.
        (
            [_file(f"share/f{i}", 0) for i in range(3000)],
            Limits(files=2000),
            "conda: installing bomb==1.0=0 went past the limit of 2000 files",
        ),
    ],
    ids=["one-huge-file", "past-the-disk", "many-files"],
)
def test_a_bomb_stops_at_the_named_limit_and_leaves_nothing_on_the_workers_disk(
    tmp_path: Path, members: list, limits: Limits, expected: str
) -> None:
    channel = tmp_path / "channel"
    add_hostile_package(channel, "bomb", "1.0", members, [_entry(m[0].name, m[0].size) for m in members])
    archive = channel / "linux-64" / "bomb-1.0-0.tar.bz2"
    assert archive.stat().st_size < 256 * 1024, "the bomb should be small packed"
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BuildFailed) as failed:
        _install(f"file://{channel}", "dependencies: [bomb]\n", work, limits=limits)
    assert failed.value.step == "environment" and failed.value.message == expected
    assert "Traceback" not in failed.value.message
    # Nothing unpacked reached the worker: no prefix, an empty output folder, no inputs left.
    assert not (work / "conda-prefix").exists()
    assert sorted(p.name for p in work.iterdir()) == ["conda-out"] and not any((work / "conda-out").iterdir())
    assert _disk_use(tmp_path / "cache") < 2 * archive.stat().st_size + 4096  # the checked archive only


@pytest.mark.parametrize("attack", ["a-link-then-a-file-through-it", "dot-dot", "absolute"])
def test_paths_and_links_that_leave_the_prefix_land_nowhere_on_the_worker(tmp_path: Path, attack: str) -> None:
    outside = tmp_path / "outside"  # a folder of the worker's, as the attacker guesses it
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    members: list = [_file("share/plain", 5)]
    paths = [_entry("share/plain", 5)]
    if attack == "a-link-then-a-file-through-it":
        link = tarfile.TarInfo("lib/out")
        link.type, link.linkname = tarfile.SYMTYPE, str(outside)
        members += [(link, None), _file("lib/out/pwned", 5)]
        paths += [{"_path": "lib/out", "path_type": "softlink"}, _entry("lib/out/pwned", 5)]
    else:
        # From the prefix up past the root and down again, or the host path itself.
        name = (
            "../" * (len(work.parts) + 2) + f"{str(outside)[1:]}/pwned" if attack == "dot-dot" else f"{outside}/pwned"
        )
        members.append(_file(name, 5))
        paths.append(_entry(name, 5))
    channel = tmp_path / "channel"
    add_hostile_package(channel, "escape", "1.0", members, paths)
    with pytest.raises(BuildFailed) as failed:
        _install(f"file://{channel}", "dependencies: [escape]\n", work)
    if attack == "a-link-then-a-file-through-it":  # rattler's unpacking stops at the link
        assert failed.value.message == (
            "conda: installing escape==1.0=0 failed: an io error occurred: failed to unpack "
            "`lib/out/pwned`: No such file or directory (os error 2)"
        )
    else:
        assert (
            failed.value.message == f"conda: escape==1.0=0 has a path that leaves the environment ({name!r}); refused"
        )
    assert list(outside.iterdir()) == [], "a package wrote outside its prefix on the worker"
    assert not (work / "conda-prefix").exists()


def test_the_install_reads_none_of_the_workers_files(tmp_path: Path) -> None:
    # A secret in the worker's data folder, and a package whose archive holds links to it
    # that its paths.json calls plain files (one with a prefix placeholder, which the
    # installer reads to patch): linked or patched on the worker, its bytes reach the image.
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    secret = data / "secret.key"
    token = secrets.token_hex(16).encode()
    secret.write_bytes(b"/opt/placeholder " + token + b"\n")
    secret.chmod(0o600)
    members, paths = [], []
    for name, extra in (
        ("share/copied", {}),
        ("share/patched", {"prefix_placeholder": "/opt/placeholder", "file_mode": "text"}),
    ):
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, str(secret)
        members.append((link, None))
        digest = hashlib.sha256(secret.read_bytes()).hexdigest()
        paths.append(_entry(name, secret.stat().st_size, sha256=digest, **extra))
    channel = tmp_path / "channel"
    add_hostile_package(channel, "reader", "1.0", members, paths)
    work = tmp_path / "work"
    work.mkdir()
    lines: list[str] = []
    try:
        env = _install(f"file://{channel}", "dependencies: [reader]\n", work, lines=lines)
    except BuildFailed as exc:
        print(exc.message)
        assert token.decode() not in exc.message and "Traceback" not in exc.message
    else:
        files = _layer_bytes(env, tmp_path)
        leaked = [n for n, body in files.items() if isinstance(body, bytes) and token in body]
        assert not leaked, f"the worker's secret is in the image: {leaked}"
    assert token.decode() not in "\n".join(lines)
    assert any(line.strip() == "mms-conda: unpacking reader==1.0=0" for line in lines), "not contained"


def test_an_archive_that_is_not_the_one_its_index_describes_fails_naming_the_package(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    add_package(channel, "greeting", "1.0", {"share/greeting": b"hello"})
    add_package(channel, "other", "1.0", {"share/other": b"other"})
    # The index lies: greeting's entry describes bytes other than those served.
    archive = channel / "linux-64" / "greeting-1.0-0.tar.bz2"
    archive.write_bytes((channel / "linux-64" / "other-1.0-0.tar.bz2").read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BuildFailed) as failed:
        _install(f"file://{channel}", "dependencies: [greeting]\n", work)
    assert failed.value.message == (
        f"conda: greeting==1.0=0: the archive at file://{archive} is not the one its channel's index "
        "describes (sha256 mismatch); refused"
    )
    assert not (work / "conda-prefix").exists()


def test_an_index_with_only_md5_is_checked_by_md5_and_one_with_neither_is_refused(tmp_path: Path) -> None:
    import json

    channel = tmp_path / "channel"
    add_package(channel, "greeting", "1.0", {"share/greeting": b"hello"})
    index_file = channel / "linux-64" / "repodata.json"
    repodata = json.loads(index_file.read_text())
    entry = repodata["packages"]["greeting-1.0-0.tar.bz2"]
    del entry["sha256"]
    index_file.write_text(json.dumps(repodata))
    env = _install(f"file://{channel}", "dependencies: [greeting]\n", _work(tmp_path))
    assert env.packages == ("greeting==1.0=0",)
    # An md5 can be forged to match: such an environment is never kept for another build.
    kept = tmp_path / "cache" / "environments"
    assert not [e for e in kept.iterdir() if not e.name.startswith(".")] if kept.exists() else True
    entry["md5"] = "0" * 32
    index_file.write_text(json.dumps(repodata))
    with pytest.raises(BuildFailed, match=r"conda: greeting==1\.0=0: .* \(md5 mismatch\); refused"):
        _install(f"file://{channel}", "dependencies: [greeting]\n", _work(tmp_path / "b"))
    del entry["md5"]
    index_file.write_text(json.dumps(repodata))
    with pytest.raises(BuildFailed, match=r"conda: greeting==1\.0=0: its channel gives no sha256 or md5"):
        _install(f"file://{channel}", "dependencies: [greeting]\n", _work(tmp_path / "c"))


def _work(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=folder))


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


@pytest.fixture
def served_channel(tmp_path: Path) -> Iterator[tuple[Path, int, list[str]]]:
    """A channel served over HTTP on 127.0.0.1; the paths asked for."""
    channel = tmp_path / "channel"
    add_package(channel, "greeting", "1.0", {"share/greeting": b"hello"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(channel)))
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield channel, server.server_address[1], server.seen  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_packages_over_http_come_through_the_fetcher(tmp_path: Path, served_channel) -> None:
    _channel, port, seen = served_channel
    policy = FetchPolicy(allow_hosts=frozenset({f"localhost:{port}"}), deadline=30)
    env = _install(f"http://localhost:{port}", "dependencies: [greeting]\n", _work(tmp_path), policy=policy)
    assert env.packages == ("greeting==1.0=0",)
    assert "/linux-64/greeting-1.0-0.tar.bz2" in seen


def test_a_channel_host_that_moves_to_a_private_address_is_refused_for_the_download(
    tmp_path: Path, served_channel
) -> None:
    # DNS rebinding: the channel's name answers a public address when it is checked, then
    # loopback. rattler's own connection (the repodata) follows the second answer; the
    # package download, the fetcher's, resolves again, is refused and never sent.
    _channel, port, seen = served_channel
    answers = [PUBLIC_IP]

    def resolver(host: str, port: int, *args: object, **kwargs: object) -> list[tuple]:
        assert host == "localhost"
        address = answers.pop(0) if answers else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    with pytest.raises(BuildFailed) as failed:
        _install(
            f"http://localhost:{port}",
            "dependencies: [greeting]\n",
            _work(tmp_path),
            policy=FetchPolicy(deadline=30),
            resolver=resolver,
        )
    assert failed.value.message.startswith(
        f"conda: downloading greeting==1.0=0 failed: refusing http://localhost:{port}/linux-64/greeting-1.0-0.tar.bz2: "
        "host localhost is at a loopback address"
    ), failed.value.message
    assert not any(path.endswith(".tar.bz2") for path in seen), "the package was downloaded"


def test_a_fifo_in_a_package_reaches_the_image_as_a_plain_file_at_most(tmp_path: Path) -> None:
    fifo = tarfile.TarInfo("share/pipe")
    fifo.type = tarfile.FIFOTYPE
    channel = tmp_path / "channel"
    add_hostile_package(channel, "piped", "1.0", [(fifo, None)], [_entry("share/pipe")])
    env = _install(f"file://{channel}", "dependencies: [piped]\n", _work(tmp_path))
    assert _layer_bytes(env, tmp_path)["opt/mms/conda/share/pipe"] == b""  # rattler's copy of it


def test_what_the_sandbox_made_is_taken_as_plain_files_and_links_only(tmp_path: Path) -> None:
    import os

    from workers.oci.conda_env import _take_prefix

    out = tmp_path / "out"
    (out / "prefix" / "bin").mkdir(parents=True)
    tool = out / "prefix" / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    tool.chmod(0o4755)  # setuid: dropped
    (out / "prefix" / "etc").symlink_to("/etc")  # kept as a link, never followed
    (out / "pkgs").mkdir()
    os.link(tool, out / "pkgs" / "tool")  # a link within the output: fine
    taken = tmp_path / "taken"
    _take_prefix(out, taken)
    assert (taken / "bin" / "tool").stat().st_mode & 0o7777 == 0o755
    assert os.readlink(taken / "etc") == "/etc" and not (taken / "etc" / "passwd").is_symlink()
    # A file linked to one outside the output (a worker's file, where that is possible).
    worker_file = tmp_path / "worker-secret"
    worker_file.write_bytes(b"secret")
    os.link(worker_file, out / "prefix" / "leak")
    with pytest.raises(BuildFailed, match="conda: leak is linked to a file outside the environment"):
        _take_prefix(out, tmp_path / "again")
    (out / "prefix" / "leak").unlink()
    os.mkfifo(out / "prefix" / "pipe")
    with pytest.raises(BuildFailed, match="conda: pipe is a fifo; an environment holds files, folders and links only"):
        _take_prefix(out, tmp_path / "third")
