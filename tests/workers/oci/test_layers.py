"""Reproducible layers: same files, same bytes; fixed owners, modes and times; no escapes."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from workers.build_context import FIXED_MTIME, InvalidBuildSpec
from workers.oci.layers import LayerBuilder


def _tree(root: Path, *, mtime: int) -> Path:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "b.txt").write_text("b")
    (root / "pkg" / "a.py").write_text("print('a')")
    (root / "pkg" / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (root / "pkg" / "sub" / "run.sh").chmod(0o700)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"worker-bytecode")
    for path in root.rglob("*"):
        os.utime(path, (mtime, mtime))
    return root


def _layer(root: Path, dest: Path):
    builder = LayerBuilder()
    builder.add_tree(root / "pkg", "/opt/app")
    builder.add_bytes("/opt/mms/bin/start", b"#!/bin/sh\n", executable=True)
    return builder.write(dest, "test layer")


def test_the_same_files_give_the_same_bytes_whatever_their_times_and_place(tmp_path: Path) -> None:
    first = _layer(_tree(tmp_path / "one", mtime=1_600_000_000), tmp_path / "one.tar.gz")
    second = _layer(_tree(tmp_path / "two", mtime=1_700_000_000), tmp_path / "two.tar.gz")
    assert first.digest == second.digest and first.diff_id == second.diff_id
    assert first.path.read_bytes() == second.path.read_bytes()
    data = first.path.read_bytes()
    assert first.digest == f"sha256:{hashlib.sha256(data).hexdigest()}"
    assert first.diff_id == f"sha256:{hashlib.sha256(gzip.decompress(data)).hexdigest()}"
    assert first.size == len(data)


def test_entries_are_sorted_owned_by_root_with_fixed_modes_and_times(tmp_path: Path) -> None:
    layer = _layer(_tree(tmp_path / "t", mtime=1_650_000_000), tmp_path / "l.tar.gz")
    data = layer.path.read_bytes()
    assert data[4:8] == b"\0\0\0\0" and data[3] & 0x08 == 0  # gzip: no time, no file name
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert names[:2] == ["opt", "opt/app"]  # parents come first, and exist
    assert "opt/app/__pycache__" not in names and not [n for n in names if n.endswith(".pyc")]
    for member in members:
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == FIXED_MTIME
        assert not member.name.startswith("/") and str(tmp_path) not in member.name
    modes = {m.name: m.mode for m in members}
    assert modes["opt/app"] == 0o755 and modes["opt/app/b.txt"] == 0o644
    assert modes["opt/app/sub/run.sh"] == 0o755 and modes["opt/mms/bin/start"] == 0o755


def test_a_link_in_the_tree_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "secret").symlink_to("/etc/shadow")
    with pytest.raises(InvalidBuildSpec, match="secret"):
        LayerBuilder().add_tree(tmp_path / "pkg", "/opt/app")


def test_a_path_that_climbs_out_is_refused() -> None:
    with pytest.raises(InvalidBuildSpec, match=r"\.\."):
        LayerBuilder().add_bytes("/opt/../../etc/passwd", b"x")


def test_parallel_gzip_is_one_valid_stream_whatever_the_write_sizes(tmp_path: Path) -> None:
    from workers.oci.layers import ParallelGzip

    data = os.urandom(3 << 20) + b"model weights " * 300_000 + os.urandom(1000)
    outputs = []
    for piece in (len(data), 100_000, 7):
        out = io.BytesIO()
        with ParallelGzip(out, 1) as gz:
            for start in range(0, len(data), piece if piece > 7 else 1 << 16):
                gz.write(data[start : start + (piece if piece > 7 else 1 << 16)])
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] == outputs[2]  # blocks, not writes, decide the bytes
    (tmp_path / "x.gz").write_bytes(outputs[0])
    assert gzip.decompress(outputs[0]) == data
    assert os.system(f"gzip -t {tmp_path / 'x.gz'}") == 0  # the reference implementation agrees


def test_a_streamed_layer_is_byte_for_byte_the_written_one(tmp_path: Path) -> None:
    builder = LayerBuilder()
    builder.add_bytes("/opt/models/m/1/model.bin", os.urandom(5_000_000))
    builder.add_bytes("/opt/app/score.py", b"def init(): pass\n")
    written = builder.write(tmp_path / "layer.tar.gz", "history", level=1)
    stream = builder.stream("history", level=1)
    chunks = list(stream)
    assert len(chunks) > 1  # it arrives in pieces, while it is made
    data = b"".join(chunks)
    assert data == written.path.read_bytes()
    assert (stream.layer.digest, stream.layer.diff_id, stream.layer.size) == (
        written.digest,
        written.diff_id,
        written.size,
    )
    assert builder.diff_id() == written.diff_id  # the cheap key: the tar's digest, no gzip
    with pytest.raises(RuntimeError, match="once"):
        list(stream)


def test_a_reader_that_stops_early_does_not_leave_the_producer_running() -> None:
    import threading

    builder = LayerBuilder()
    builder.add_bytes("/big.bin", os.urandom(40_000_000))
    stream = iter(builder.stream("history", level=1))
    next(stream)
    stream.close()  # the upload failed: the generator is closed
    for thread in threading.enumerate():
        if thread.name == "layer-stream":
            thread.join(timeout=10)
            assert not thread.is_alive()
