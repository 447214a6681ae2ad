"""Hostile-archive tests for workers.unpack."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from workers.unpack import UnpackError, UnpackLimits, detect_format, unpack_archive

SMALL = UnpackLimits(max_total_bytes=1_000_000, max_files=50)


# --- archive builders ----------------------------------------------------------------


def make_zip(path: Path, entries, compression=zipfile.ZIP_DEFLATED) -> Path:
    """entries: (name, data) or (name, data, unix_mode); data None makes a directory."""
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data, *mode in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if mode:
                info.external_attr = mode[0] << 16
            zf.writestr(info, data if data is not None else b"")
    return path


def tar_entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(path: Path, entries, compress: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if compress else "w") as tf:
        for info, fileobj in entries:
            tf.addfile(info, fileobj)
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def refused(
    archive: Path, dest: Path, reason: str, entry: str | None = None, limits: UnpackLimits = SMALL
) -> UnpackError:
    with pytest.raises(UnpackError) as err:
        unpack_archive(archive, dest, limits=limits)
    assert err.value.reason == reason, err.value
    if entry is not None:
        assert err.value.entry == entry
        assert repr(entry) in str(err.value)  # the message names the offending entry
    assert not dest.exists(), "a failed unpack must leave nothing behind"
    return err.value


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "out"


# --- valid archives ------------------------------------------------------------------


def test_valid_zip_extracts(tmp_path, dest):
    archive = make_zip(
        tmp_path / "m.zip",
        [
            ("model/", None),
            ("model/weights.bin", b"\x00" * 1000),
            ("model/score.py", b"print('hi')\n", 0o100755),
            ("README", b"readme"),
        ],
    )
    result = unpack_archive(archive, dest, limits=SMALL)
    assert tree(dest) == {
        "README": b"readme",
        "model": None,
        "model/score.py": b"print('hi')\n",
        "model/weights.bin": b"\x00" * 1000,
    }
    assert (result.format, result.files, result.total_bytes) == ("zip", 4, 1018)
    assert (dest / "model/score.py").stat().st_mode & 0o777 == 0o755
    assert (dest / "README").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "compress, suffix, fmt",
    [
        (True, "model.tar.gz", "tar.gz"),
        (True, "model.tgz", "tar.gz"),
        (False, "model.tar", "tar"),
        (True, "misnamed.zip", "tar.gz"),  # detected by content, not by name
    ],
)
def test_valid_tar_extracts(tmp_path, dest, compress, suffix, fmt):
    archive = make_tar(
        tmp_path / suffix,
        [
            tar_entry("./", kind=tarfile.DIRTYPE, mode=0o755),
            tar_entry("./model", kind=tarfile.DIRTYPE, mode=0o755),
            tar_entry("./model/weights.bin", b"w" * 5000),
            tar_entry("./conda.yml", b"deps: []\n", mode=0o4755),
        ],
        compress=compress,
    )
    result = unpack_archive(archive, dest, limits=SMALL)
    assert tree(dest) == {"conda.yml": b"deps: []\n", "model": None, "model/weights.bin": b"w" * 5000}
    assert (result.format, result.total_bytes) == (fmt, 5009)
    assert (dest / "conda.yml").stat().st_mode & 0o7777 == 0o755  # no setuid from the archive


def test_extracts_into_existing_directory_without_clobbering(tmp_path, dest):
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    archive = make_zip(tmp_path / "m.zip", [("a.txt", b"a")])
    unpack_archive(archive, dest, limits=SMALL)
    assert tree(dest) == {"a.txt": b"a", "keep.txt": b"mine"}
    with pytest.raises(UnpackError) as err:  # a second run would clobber a.txt
        unpack_archive(make_zip(tmp_path / "n.zip", [("a.txt", b"new"), ("b.txt", b"b")]), dest, limits=SMALL)
    assert err.value.reason == "conflict"
    assert tree(dest) == {"a.txt": b"a", "keep.txt": b"mine"}


# --- unsafe paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../evil",
        "a/../../evil",
        "a/b/../../../evil",
        "..",
        "/etc/evil",
        "//evil",
        "C:/evil",
        "c:evil",
        "..\\evil",
        "a\\..\\..\\evil",
    ],
)
def test_zip_unsafe_paths(tmp_path, dest, name):
    archive = make_zip(tmp_path / "m.zip", [("ok.txt", b"fine"), (name, b"pwned")])
    refused(archive, dest, "unsafe_path", name)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["../evil", "./../evil", "a/../../evil", "/tmp/evil", "C:\\evil"])
def test_tar_unsafe_paths(tmp_path, dest, name):
    archive = make_tar(tmp_path / "m.tgz", [tar_entry("ok.txt", b"fine"), tar_entry(name, b"x")])
    refused(archive, dest, "unsafe_path", name)
    assert not (tmp_path / "evil").exists()


# --- links and special files -------------------------------------------------------


@pytest.mark.parametrize(
    "kind, link",
    [
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.SYMTYPE, "inside.txt"),
        (tarfile.LNKTYPE, "/etc/passwd"),
        (tarfile.LNKTYPE, "inside.txt"),
    ],
)
def test_tar_links_refused(tmp_path, dest, kind, link):
    archive = make_tar(tmp_path / "m.tgz", [tar_entry("inside.txt", b"x"), tar_entry("link", kind=kind, link=link)])
    refused(archive, dest, "link", "link")


def test_tar_symlink_then_write_through_it_refused(tmp_path, dest):
    # The classic two-step escape: a dir symlink, then a file "through" it.
    archive = make_tar(
        tmp_path / "m.tgz",
        [
            tar_entry("sub", kind=tarfile.SYMTYPE, link=str(tmp_path)),
            tar_entry("sub/evil", b"pwned"),
        ],
    )
    refused(archive, dest, "link", "sub")
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_devices_and_fifos_refused(tmp_path, dest, kind):
    archive = make_tar(tmp_path / "m.tar", [tar_entry("dev", kind=kind)], compress=False)
    refused(archive, dest, "special_file", "dev")


def test_zip_symlink_refused(tmp_path, dest):
    archive = make_zip(tmp_path / "m.zip", [("ok.txt", b"x"), ("link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    refused(archive, dest, "link", "link")


def test_zip_fifo_refused(tmp_path, dest):
    archive = make_zip(tmp_path / "m.zip", [("pipe", b"", stat.S_IFIFO | 0o644)])
    refused(archive, dest, "special_file", "pipe")


# --- bombs and limits ----------------------------------------------------------------


def test_zip_bomb_refused_while_writing(tmp_path, dest):
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", b"\x00" * 5_000_000)])
    assert archive.stat().st_size < 50_000  # tiny archive, huge content
    refused(archive, dest, "too_large", "zeros.bin")


def test_total_size_counts_all_files(tmp_path, dest):
    entries = [tar_entry(f"part{i}", b"a" * 300_000) for i in range(4)]  # each under the cap
    refused(make_tar(tmp_path / "m.tgz", entries), dest, "too_large", "part3")


@pytest.mark.parametrize("builder", ["zip", "tar"])
def test_too_many_files(tmp_path, dest, builder):
    limits = UnpackLimits(max_total_bytes=1_000_000, max_files=10)
    if builder == "zip":
        archive = make_zip(tmp_path / "m.zip", [(f"f{i}", b"") for i in range(11)])
    else:
        archive = make_tar(tmp_path / "m.tgz", [tar_entry(f"f{i}") for i in range(11)])
    refused(archive, dest, "too_many_files", "f10", limits=limits)


def test_duplicate_entry_refused(tmp_path, dest):
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = make_zip(tmp_path / "m.zip", [("a.txt", b"1"), ("a.txt", b"2")])
    refused(archive, dest, "duplicate", "a.txt")


def test_file_then_directory_of_same_name_refused(tmp_path, dest):
    archive = make_tar(tmp_path / "m.tgz", [tar_entry("a", b"file"), tar_entry("a/b", b"x")])
    refused(archive, dest, "duplicate", "a/b")


# --- formats and failure cleanup --------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"just some text, not an archive\n" * 20,
        b"",
        gzip.compress(b"not a tar" * 100),
        b"BZh91AY&SY" + b"\x00" * 600,
    ],
)
def test_unknown_format_refused(tmp_path, dest, content):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(content)
    assert detect_format(archive) is None
    err = refused(archive, dest, "unsupported_format")
    assert "not a zip, tar or tar.gz" in str(err)


def test_truncated_archive_is_corrupt(tmp_path, dest):
    good = make_tar(tmp_path / "m.tgz", [tar_entry("big", bytes(range(256)) * 4000)])
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(broken, dest, "corrupt")


def test_failure_after_good_entries_leaves_existing_dest_untouched(tmp_path, dest):
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    archive = make_tar(
        tmp_path / "m.tgz",
        [
            tar_entry("model", kind=tarfile.DIRTYPE, mode=0o755),
            tar_entry("model/a.bin", b"a" * 1000),
            tar_entry("model/b.bin", b"b" * 1000),
            tar_entry("../evil", b"pwned"),
        ],
    )
    with pytest.raises(UnpackError) as err:
        unpack_archive(archive, dest, limits=SMALL)
    assert err.value.entry == "../evil"
    assert tree(dest) == {"keep.txt": b"mine"}  # no partial model/, no temp dir
