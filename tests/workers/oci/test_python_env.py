"""The target Python comes from the base image, and its wheels are chosen for it, not the worker."""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import uv

from workers.builders import BuildFailed
from workers.oci.accounts import read_base_files
from workers.oci.media import OCI_LAYER
from workers.oci.python_env import (
    MANYLINUX_LEVELS,
    TargetPython,
    _find_python,
    dependency_cache_key,
    detect_target,
    glibc_banner,
    install_dependencies,
    normalise_requirements,
    platform_for,
    tar_reader,
)

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _layer(entries: dict[str, bytes | str]) -> bytes:
    """A gzip tar: bytes are files, a str is a symlink target."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, value in entries.items():
            info = tarfile.TarInfo(name)
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            else:
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return gzip.compress(raw.getvalue())


def _openers(*layers: bytes):
    @contextmanager
    def opener(data: bytes):
        yield tar_reader(iter([data[i : i + 1000] for i in range(0, len(data), 1000)]), OCI_LAYER)

    return lambda: (opener(layer) for layer in layers)


GLIBC = b"\x00junk GNU C Library (Debian GLIBC 2.36-9+deb12u4) stable release version 2.36.\n"


def test_python_and_glibc_are_read_from_the_layers_the_last_layer_winning() -> None:
    base = _layer(
        {"usr/bin/python3.11": b"elf", "usr/bin/python3": "python3.11", "usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC}
    )
    upgrade = _layer({"usr/local/bin/python3.12": b"elf", "usr/local/bin/python3": "python3.12"})
    target = detect_target({"architecture": "amd64", "config": {}}, _openers(base, upgrade))
    assert target == TargetPython("3.12", "x86_64-manylinux_2_36", "/usr/local/bin/python3", "glibc-2.36")


def test_labels_and_env_fill_in_what_the_layers_lack_and_musl_is_refused_naming_the_base() -> None:
    # Nothing in the layers tells: the labels (or the official images' PYTHON_VERSION) do.
    config = {"architecture": "arm64", "config": {"Labels": {"org.mms.python": "3.10.4", "org.mms.libc": "glibc-2.31"}}}
    assert detect_target(config, _openers()) == TargetPython("3.10", "aarch64-manylinux_2_31", "python3", "glibc-2.31")
    bare = _layer({"usr/local/bin/python3": b"elf", "usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC})
    official = {"architecture": "amd64", "config": {"Env": ["PYTHON_VERSION=3.12.7"]}}
    assert detect_target(official, _openers(bare)).version == "3.12"
    alpine = _layer({"lib/ld-musl-x86_64.so.1": b"elf", "usr/local/bin/python3": "python3.12"})
    with pytest.raises(BuildFailed, match=r"python:3\.12-alpine uses musl libc.*glibc base image") as failed:
        detect_target(official, _openers(alpine), base="python:3.12-alpine")
    assert failed.value.step == "environment"


def test_labels_inherited_from_a_base_do_not_override_the_python_its_path_now_finds() -> None:
    # Built FROM a published trixie base (labelled 3.13) with a conda Python 3.11 put first on
    # PATH: wheels for 3.13 would not import in the Python that runs.
    system = _layer(
        {"usr/bin/python3.13": b"elf", "usr/bin/python3": "python3.13", "usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC}
    )
    conda = _layer({"opt/miniconda/bin/python3.11": b"elf", "opt/miniconda/bin/python3": "python3.11"})
    labels = {"org.mms.python": "3.13.5", "org.mms.libc": "glibc-2.41"}
    env = ["PATH=/opt/miniconda/bin:/usr/bin", "PYTHON_VERSION=3.13.5"]
    config = {"architecture": "amd64", "config": {"Labels": labels, "Env": env}}
    target = detect_target(config, _openers(system, conda))
    assert target == TargetPython("3.11", "x86_64-manylinux_2_36", "/opt/miniconda/bin/python3", "glibc-2.36")


def test_a_base_without_python_fails_clearly() -> None:
    layer = _layer({"usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC, "opt/py/bin/python3": b"elf"})
    config = {"architecture": "amd64", "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}}
    with pytest.raises(
        BuildFailed, match=r"base image x:1 has no python3 on its PATH \(/usr/local/bin:/usr/bin:/bin\)"
    ):
        detect_target(config, _openers(layer), base="base image x:1")


@pytest.mark.parametrize(
    ("glibc", "platform"),
    [
        ("glibc-2.17", "x86_64-manylinux_2_17"),
        ("glibc-2.27", "x86_64-manylinux_2_17"),  # Ubuntu 18.04: nothing between 2_17 and 2_28
        ("glibc-2.28", "x86_64-manylinux_2_28"),
        ("glibc-2.30", "x86_64-manylinux_2_28"),
        ("glibc-2.31", "x86_64-manylinux_2_31"),  # Debian bullseye
        ("glibc-2.36", "x86_64-manylinux_2_36"),  # bookworm
        ("glibc-2.41", "x86_64-manylinux_2_40"),  # trixie: newer than any level uv names
    ],
)
def test_a_glibc_level_maps_to_the_highest_level_uv_accepts_not_above_it(glibc: str, platform: str) -> None:
    assert platform_for("x86_64", glibc) == platform
    assert platform_for("aarch64", glibc) == platform.replace("x86_64", "aarch64")


def test_a_glibc_older_than_any_wheel_or_another_architecture_is_refused_naming_the_base() -> None:
    with pytest.raises(BuildFailed, match=r"centos:6 has glibc 2\.12, older than .*2\.17"):
        platform_for("x86_64", "glibc-2.12", "centos:6")
    with pytest.raises(BuildFailed, match="ppc:1 is for ppc64le"):
        platform_for("ppc64le", "glibc-2.36", "ppc:1")


def test_the_manylinux_levels_are_the_ones_this_workers_uv_accepts() -> None:
    # uv refuses a --python-platform it does not know ("invalid value 'x86_64-manylinux_2_27'").
    help_text = subprocess.run(
        [uv.find_uv_bin(), "pip", "install", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for arch in ("x86_64", "aarch64"):
        accepted = {(int(a), int(b)) for a, b in re.findall(rf"\b{arch}-manylinux_(\d+)_(\d+)", help_text)}
        assert set(MANYLINUX_LEVELS) == accepted, arch


def test_a_python_older_than_the_server_supports_is_refused() -> None:
    config = {"config": {"Labels": {"org.mms.python": "3.7.3", "org.mms.libc": "glibc-2.28"}}}
    with pytest.raises(BuildFailed, match=r"img has Python 3\.7; the scoring server needs Python 3\.8"):
        detect_target(config, _openers(), base="img")


def test_python_is_found_along_the_configs_path_following_symlinks_in_the_layers() -> None:
    # A miniconda-style base: python3 in /opt/miniconda/bin, a symlink to python3.10 there,
    # ahead of a system python3 (3.11) in /usr/bin; merged /usr (/bin → usr/bin).
    system = _layer(
        {
            "bin": "usr/bin",
            "usr/bin/python3.11": b"elf",
            "usr/bin/python3": "python3.11",
            "usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC,
        }
    )
    conda = _layer({"opt/miniconda/bin/python3.10": b"elf", "opt/miniconda/bin/python3": "python3.10"})
    path = "PATH=/opt/miniconda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    config = {"architecture": "amd64", "config": {"Env": [path]}}
    target = detect_target(config, _openers(system, conda))
    assert target == TargetPython("3.10", "x86_64-manylinux_2_36", "/opt/miniconda/bin/python3", "glibc-2.36")
    # Without that folder on PATH the system Python is the one.
    plain = {"architecture": "amd64", "config": {"Env": ["PATH=/bin:/opt/x"]}}
    assert detect_target(plain, _openers(system, conda)).executable == "/bin/python3"
    assert detect_target(plain, _openers(system, conda)).version == "3.11"


def test_symlinks_to_absolute_paths_and_linked_folders_are_followed() -> None:
    layer = _layer(
        {
            "opt/conda": "/opt/miniforge",  # a linked folder on PATH
            "opt/miniforge/bin/python3": "/opt/miniforge/libexec/../bin/python3.12",
            "opt/miniforge/bin/python3.12": b"elf",
            "usr/lib/x86_64-linux-gnu/libc-2.31.so": b"elf",
        }
    )
    config = {"config": {"Env": ["PATH=/opt/conda/bin:/usr/bin"]}}
    target = detect_target(config, _openers(layer))
    assert (target.version, target.executable, target.platform) == (
        "3.12",
        "/opt/conda/bin/python3",
        "x86_64-manylinux_2_31",
    )


def test_whiteouts_in_a_later_layer_hide_a_python_and_a_dangling_link_is_passed_over() -> None:
    base = _layer(
        {
            "opt/old/bin/python3.9": b"elf",
            "opt/old/bin/python3": "python3.9",
            "usr/local/bin/python3": "/nowhere/python3.13",  # dangling: not a Python
            "usr/bin/python3.11": b"elf",
            "usr/bin/python3": "python3.11",
            "usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC,
        }
    )
    removed = _layer({"opt/.wh.old": b""})
    config = {"config": {"Env": ["PATH=/opt/old/bin:/usr/local/bin:/usr/bin"]}}
    assert detect_target(config, _openers(base)).executable == "/opt/old/bin/python3"
    assert detect_target(config, _openers(base, removed)).executable == "/usr/bin/python3"
    opaque = _layer({"opt/old/bin/.wh..wh..opq": b"", "opt/old/bin/python3.12": b"elf"})
    # The opaque folder keeps only its own layer's files: python3 is gone, python3.12 alone stays.
    target = detect_target(config, _openers(base, opaque))
    assert (target.executable, target.version) == ("/usr/bin/python3", "3.11")
    only_versioned = {"config": {"Env": ["PATH=/opt/old/bin"]}}
    target = detect_target(only_versioned, _openers(base, opaque))
    assert (target.executable, target.version) == ("/opt/old/bin/python3.12", "3.12")


def test_a_python3_whose_version_cannot_be_told_asks_for_the_label() -> None:
    layer = _layer({"usr/bin/python3": b"elf", "usr/bin/python3.10": b"elf", "usr/bin/python3.11": b"elf"})
    with pytest.raises(BuildFailed, match=r"img has /usr/bin/python3 .*org\.mms\.python=3\.N"):
        detect_target({"config": {"Env": ["PATH=/usr/bin"]}}, _openers(layer), base="img")


def test_a_path_folder_with_shell_characters_is_not_searched() -> None:
    layer = _layer({"opt/a;b/python3.11": b"elf", "opt/a;b/python3": "python3.11", "lib/libc-2.36.so": b""})
    with pytest.raises(BuildFailed, match="no python3"):
        detect_target({"config": {"Env": ["PATH=/opt/a;b"]}}, _openers(layer))


def test_the_cache_key_follows_requirements_and_target_only() -> None:
    reqs = normalise_requirements(["six==1.17.0  # pinned", "", "# comment", " click "])
    assert reqs == ["six==1.17.0", "click"]
    key = dependency_cache_key(reqs, TargetPython("3.11", "x86_64-manylinux_2_36"))
    assert key == dependency_cache_key(list(reqs), TargetPython("3.11", "x86_64-manylinux_2_36"))
    assert key != dependency_cache_key(reqs, TargetPython("3.12", "x86_64-manylinux_2_36"))
    assert key != dependency_cache_key(reqs, TargetPython("3.11", "aarch64-manylinux_2_36"))
    assert key != dependency_cache_key(["six==1.16.0", "click"], TargetPython("3.11", "x86_64-manylinux_2_36"))


def _install(requirements: list[str], version: str, dest: Path) -> list[str]:
    lines: list[str] = []
    install_dependencies(
        requirements,
        TargetPython(version, "x86_64-manylinux_2_36"),
        dest,
        lines.append,
        ca_bundle=CA_BUNDLE if CA_BUNDLE.is_file() else None,
    )
    return lines


def test_markers_are_evaluated_for_the_target_python_not_the_worker(tmp_path: Path) -> None:
    reqs = ['tomli==2.0.1; python_version < "3.11"', "six==1.17.0"]
    _install(reqs, "3.10", tmp_path / "py310")
    _install(reqs, "3.12", tmp_path / "py312")
    assert (tmp_path / "py310" / "tomli").is_dir()  # the worker runs 3.11 and would skip it
    assert not (tmp_path / "py312" / "tomli").exists()
    assert (tmp_path / "py312" / "six.py").is_file()


def test_no_installed_file_carries_a_worker_path_or_bytecode(tmp_path: Path) -> None:
    dest = tmp_path / "site"
    _install(["wheel==0.45.1"], "3.11", dest)  # has a console script
    script = (dest / "bin" / "wheel").read_bytes()
    assert script.startswith(b"#!/usr/bin/env python3\n")
    worker_paths = [str(tmp_path).encode(), sys.prefix.encode(), sys.base_prefix.encode()]
    for path in dest.rglob("*"):
        assert path.suffix != ".pyc"
        if path.is_file():
            data = path.read_bytes()
            assert not [p for p in worker_paths if p in data], path


def test_a_package_without_a_wheel_fails_naming_it_and_the_docker_builder(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed) as failed:
        _install(["antlr4-python3-runtime==4.9.3"], "3.11", tmp_path / "site")
    assert failed.value.step == "environment"
    assert "antlr4-python3-runtime" in failed.value.message
    assert "docker builder" in failed.value.message


def test_a_package_that_does_not_exist_is_named(tmp_path: Path) -> None:
    with pytest.raises(BuildFailed, match="no-such-package-mms-xyz"):
        _install(["no-such-package-mms-xyz==1.0"], "3.11", tmp_path / "site")


# -- a hostile base's layers cost a worker little -------------------------------------------


def _pax_bomb(size: int) -> bytes:
    """A layer whose first record is a pax header of ``size`` bytes (tiny once gzipped)."""
    out = io.BytesIO()
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, size
    out.write(header.tobuf(format=tarfile.USTAR_FORMAT))
    out.write(b"1" * size + b"\0" * (-size % 512))
    passwd = tarfile.TarInfo("etc/passwd")
    passwd.size = 5
    out.write(passwd.tobuf(format=tarfile.USTAR_FORMAT) + b"root\n" + b"\0" * 507 + b"\0" * 1024)
    return gzip.compress(out.getvalue(), 9)


def test_a_huge_tar_header_fails_the_layer_at_once_instead_of_filling_memory() -> None:
    blob = _pax_bomb(8 << 20)  # 8 MiB of header in a few kB; an 8 GB one took the worker down
    assert len(blob) < 64 * 1024
    started = time.monotonic()
    with pytest.raises(tarfile.TarError, match="tar header record of 8388608 bytes"):
        read_base_files(lambda: [contextlib.nullcontext(gzip.GzipFile(fileobj=io.BytesIO(blob)))], ["etc/passwd"])
    assert time.monotonic() - started < 2
    # A header of a normal size still reads (a long path, say).
    ok = _pax_bomb(4000)
    found = read_base_files(lambda: [contextlib.nullcontext(gzip.GzipFile(fileobj=io.BytesIO(ok)))], ["etc/passwd"])
    assert found["etc/passwd"].data == b"root\n"


def test_a_deep_symlink_and_a_huge_libc_resolve_fast() -> None:
    started = time.monotonic()
    assert _find_python({"usr/local/bin": "/" + "a/" * 80_000}, ["/usr/local/bin"]) is None
    data = b"GNU C Library " + b"x" * (16 << 20) + b"\nGNU C Library (Debian GLIBC) stable release version 2.36.\n"
    assert glibc_banner(data) == (2, 36)
    assert glibc_banner(b"GNU C Library" * 100_000) is None
    assert time.monotonic() - started < 5  # minutes each before
