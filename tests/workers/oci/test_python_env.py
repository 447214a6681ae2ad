"""The target Python comes from the base image, and its wheels are chosen for it, not the worker."""

from __future__ import annotations

import gzip
import io
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from workers.builders import BuildFailed
from workers.oci.media import OCI_LAYER
from workers.oci.python_env import (
    TargetPython,
    dependency_cache_key,
    detect_target,
    install_dependencies,
    normalise_requirements,
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
    assert target == TargetPython("3.12", "x86_64-manylinux_2_36")


def test_labels_and_env_spare_the_scan_and_musl_is_recognised() -> None:
    def no_scan():
        raise AssertionError("the layers were read although the config says it all")

    config = {"architecture": "arm64", "config": {"Labels": {"org.mms.python": "3.10.4", "org.mms.libc": "glibc-2.31"}}}
    assert detect_target(config, no_scan) == TargetPython("3.10", "aarch64-manylinux_2_31")
    alpine = _layer({"lib/ld-musl-x86_64.so.1": b"elf"})
    official = {"architecture": "amd64", "config": {"Env": ["PYTHON_VERSION=3.12.7"]}}
    assert detect_target(official, _openers(alpine)) == TargetPython("3.12", "x86_64-unknown-linux-musl")


def test_a_base_without_python_fails_clearly() -> None:
    layer = _layer({"usr/lib/x86_64-linux-gnu/libc.so.6": GLIBC})
    with pytest.raises(BuildFailed, match="no python3"):
        detect_target({"architecture": "amd64"}, _openers(layer))


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
