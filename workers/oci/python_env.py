"""The Python environment layer: which Python the base image has, and its packages as wheels.

The target is read from the base image, never from the worker: its labels or ``Env`` when
they say (``org.mms.python``, ``PYTHON_VERSION`` as the official images set), else the
layers themselves (the ``python3`` a ``PATH`` lookup finds, and the C library: glibc's
version string inside ``libc.so.6``, or musl's loader). Packages are installed with
``uv pip install --target --python-version --python-platform --only-binary :all:``, which
evaluates environment markers for the target (plain pip evaluates them for the host, pip
issue 11664), then console-script shebangs are rewritten so no worker path ships.

A few pure-Python projects publish source distributions only (pyspark): their wheels are
built once per worker with pip (a pure-Python wheel fits every target) and offered to uv
with ``--find-links``, so the whole environment still resolves together, from wheels.
"""

from __future__ import annotations

import gzip
from importlib import metadata
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import uv

from workers.builders import BuildFailed, Log

__all__ = [
    "LAYOUT_VERSION",
    "TargetPython",
    "dependency_cache_key",
    "detect_java",
    "detect_target",
    "install_dependencies",
    "source_only",
]

LAYOUT_VERSION = "1"  # bump when the dependency layer's layout changes: old cache entries retire
SITE_PACKAGES = "/opt/mms/site-packages"
_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
_VERSION = re.compile(r"(\d+)\.(\d+)")
_PYTHON_BIN = re.compile(r"^(?:\./)?(usr/local/bin|usr/bin)/python3(?:\.(\d+))?$")
_LIBC = re.compile(r"^(?:\./)?(?:usr/)?lib(?:64)?/(?:[a-z0-9_]+-linux-gnu/)?(libc\.so\.6|libc-(\d+)\.(\d+)\.so)$")
_MUSL = re.compile(r"^(?:\./)?lib/ld-musl-[a-z0-9_]+\.so\.1$")
_GLIBC_BANNER = re.compile(rb"GNU C Library[^\n]*?version (\d+)\.(\d+)")
_NO_WHEEL = (re.compile(r"Wheels are required for `([^`]+)`"),
             re.compile(r"Because (\S+?)(?:[=<>!~][^ ]*)? has no (?:usable )?wheels"),
             re.compile(r"Because (\S+?)(?:[=<>!~][^ ]*)? has no wheels with a matching"))
_NOT_FOUND = re.compile(r"Because (\S+) was not found in the package registry")
_MAX_LIBC_READ = 16 << 20
# Where Debian, the Temurin and the former official openjdk images put a java launcher.
_JAVA_BIN = re.compile(r"^(?:\./)?(?:usr/bin/java|usr/lib/jvm/[^/]+/(?:jre/)?bin/java|"
                       r"opt/java/[^/]+/bin/java|usr/local/openjdk-[^/]+/bin/java)$")
# Pure-Python projects published as source distributions only (their wheel is built here).
SOURCE_ONLY = frozenset({"pyspark"})
_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class TargetPython:
    """The base image's Python, as uv names it."""

    version: str  # "3.11"
    platform: str  # uv's --python-platform, e.g. "x86_64-manylinux_2_36"

    def describe(self) -> str:
        return f"Python {self.version} on {self.platform}"


def detect_target(config: dict, layers: Callable[[], Iterable[AbstractContextManager[Iterator[bytes]]]]) -> TargetPython:
    """Read the target from the image ``config``, scanning ``layers`` only when it must.

    ``layers()`` yields one opener per layer, base first; each opens the gzip blob as chunks.
    """
    arch = _ARCH.get(config.get("architecture", "amd64"), config.get("architecture", "amd64"))
    labels = (config.get("config") or {}).get("Labels") or {}
    env = dict(e.split("=", 1) for e in (config.get("config") or {}).get("Env") or [] if "=" in e)
    version = _short(labels.get("org.mms.python")) or _short(env.get("PYTHON_VERSION"))
    libc = labels.get("org.mms.libc")
    if version is None or libc is None:
        found_version, found_libc = _scan(layers())
        version = version or found_version
        libc = libc or found_libc
    if version is None:
        raise BuildFailed("environment", "the base image has no python3 (looked in /usr/bin "
                                         "and /usr/local/bin); use a base image with Python")
    if libc is None:
        raise BuildFailed("environment", "cannot tell the base image's C library (no glibc "
                                         "libc.so.6, no musl loader found)")
    if libc == "musl":
        return TargetPython(version, f"{arch}-unknown-linux-musl")
    major, minor = libc.removeprefix("glibc-").split(".")[:2]
    return TargetPython(version, f"{arch}-manylinux_{major}_{minor}")


def _short(text: str | None) -> str | None:
    match = _VERSION.match(text or "")
    return f"{match[1]}.{match[2]}" if match else None


def _scan(openers: Iterable[AbstractContextManager[Iterator[bytes]]]) -> tuple[str | None, str | None]:
    """(Python major.minor, libc) from the layers; later layers override earlier ones."""
    versions: dict[str, set[str]] = {}  # bin dir → python3.N present
    links: dict[str, str] = {}  # bin dir → what python3 links to
    libc = None
    for opener in openers:
        with opener as chunks, gzip.GzipFile(fileobj=_ChunkReader(chunks)) as gz, \
                tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                name = member.name
                match = _PYTHON_BIN.match(name)
                if match:
                    folder, minor = match[1], match[2]
                    if minor:
                        versions.setdefault(folder, set()).add(f"3.{minor}")
                    elif member.issym():
                        links[folder] = member.linkname
                    continue
                if _MUSL.match(name):
                    libc = "musl"
                    continue
                match = _LIBC.match(name)
                if match and match[2]:
                    libc = f"glibc-{match[2]}.{match[3]}"
                elif match and member.isfile() and member.size <= _MAX_LIBC_READ:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    banner = _GLIBC_BANNER.search(data)
                    if banner:
                        libc = f"glibc-{int(banner[1])}.{int(banner[2])}"
    for folder in ("usr/local/bin", "usr/bin"):  # PATH order
        link = links.get(folder, "")
        match = re.search(r"python(3\.\d+)$", link)
        if match:
            return match[1], libc
        if len(versions.get(folder, ())) == 1:
            return next(iter(versions[folder])), libc
    return None, libc


class _ChunkReader:
    """A file-like ``read`` over an iterator of byte chunks (for gzip's streaming reader)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buffer = iter(chunks), b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def detect_java(config: dict, layers: Callable[[], Iterable[AbstractContextManager[Iterator[bytes]]]]) -> str | None:
    """The base image's Java: its ``org.mms.java`` label, else the path of a ``java`` launcher
    found in its layers (a later layer's whiteout removes it), else None."""
    labels = (config.get("config") or {}).get("Labels") or {}
    if labels.get("org.mms.java"):
        return labels["org.mms.java"]
    found: set[str] = set()
    for opener in layers():
        with opener as chunks, gzip.GzipFile(fileobj=_ChunkReader(chunks)) as gz, \
                tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                if base.startswith(".wh."):
                    gone = f"{folder}/{base[4:]}".lstrip("./")
                    found = {f for f in found if f != gone and not f.startswith(f"{gone}/")}
                elif _JAVA_BIN.match(member.name) and (member.isfile() or member.issym()):
                    found.add(member.name.lstrip("./"))
    return f"/{min(found)}" if found else None


def source_only(requirements: Iterable[str]) -> list[str]:
    """The requirement lines naming a project in ``SOURCE_ONLY``."""
    picked = []
    for line in requirements:
        match = _NAME.match(line)
        if match and re.sub(r"[-_.]+", "-", match[1]).lower() in SOURCE_ONLY:
            picked.append(line)
    return picked


def build_source_wheels(requirements: list[str], wheelhouse: Path, log: Log, *,
                        ca_bundle: Path | None = None, timeout: float = 1800) -> None:
    """Build wheels of the ``SOURCE_ONLY`` requirements into ``wheelhouse`` (kept across
    builds: a wheel already there is reused by pip, not built again)."""
    wanted = source_only(requirements)
    if not wanted:
        return
    wheelhouse.mkdir(parents=True, exist_ok=True)
    index = [part for line in requirements if line.startswith(("--index-url", "--extra-index-url"))
             for part in line.split(None, 1)]
    env = dict(os.environ)
    if ca_bundle is not None:
        env["PIP_CERT"] = str(ca_bundle)
    if os.environ.get("UV_INDEX_URL") and not index:
        index = ["--index-url", os.environ["UV_INDEX_URL"]]
    for requirement in wanted:
        log(f"mms: {requirement} is published as source only: building its pure-Python wheel")
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "off", "--find-links", str(wheelhouse), "-w", str(wheelhouse),
                   *index, requirement]
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildFailed("environment", f"cannot build a wheel of {requirement}: {exc}") from None
        for line in done.stdout.splitlines()[-5:]:
            log(f"    {line}")
        if done.returncode != 0:
            errors = [x.strip() for x in done.stdout.splitlines() if x.startswith("ERROR")]
            raise BuildFailed("environment", f"building a wheel of {requirement} failed: "
                              + ("; ".join(errors) or "pip wheel exited with "
                                 f"{done.returncode}"))


def normalise_requirements(lines: Iterable[str]) -> list[str]:
    """Requirement lines without blanks, comments or trailing spaces, order kept."""
    kept = []
    for line in lines:
        text = line.split(" #", 1)[0].strip()
        if text and not text.startswith("#"):
            kept.append(text)
    return kept


def dependency_cache_key(requirements: list[str], target: TargetPython) -> str:
    """What the dependency layer is a function of; equal keys reuse one layer."""
    material = {"requirements": requirements, "target": asdict(target),
                "uv": metadata.version("uv"), "layout": LAYOUT_VERSION}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def install_dependencies(requirements: list[str], target: TargetPython, dest: Path, log: Log,
                         *, cache_dir: Path | None = None, ca_bundle: Path | None = None,
                         timeout: float = 1800, wheelhouse: Path | None = None) -> None:
    """Install wheels for ``requirements`` into ``dest`` for ``target``; BuildFailed if not.

    ``wheelhouse`` holds the wheels ``build_source_wheels`` made for source-only projects.
    """
    dest.mkdir(parents=True, exist_ok=True)
    req_file = dest.parent / "requirements.txt"
    req_file.write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
    command = [uv.find_uv_bin(), "pip", "install", "--no-config", "--target", str(dest),
               "--python-version", target.version, "--python-platform", target.platform,
               "--only-binary", ":all:", "--no-progress", "-r", str(req_file)]
    if wheelhouse is not None and source_only(requirements):
        command += ["--find-links", str(wheelhouse)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k in _UV_PASSTHROUGH}
    if cache_dir is not None:
        env["UV_CACHE_DIR"] = str(cache_dir)
    else:
        env["UV_NO_CACHE"] = "1"
    if ca_bundle is not None:
        env["SSL_CERT_FILE"] = str(ca_bundle)
    log(f"mms: installing {len(requirements)} requirement(s) as wheels for {target.describe()}")
    output: list[str] = []
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    except OSError as exc:
        raise BuildFailed("environment", f"cannot run uv: {exc}") from None
    with proc:
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                output.append(line.rstrip())
                log(f"    {line.rstrip()}")
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:  # a cancelled build (log raised) or a timeout
                proc.kill()
    if code != 0:
        raise BuildFailed("environment", _explain(output, target))
    _rewrite_shebangs(dest / "bin")


_UV_PASSTHROUGH = {"UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX",
                   "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT"}


def _explain(output: list[str], target: TargetPython) -> str:
    text = "\n".join(output)
    for pattern in _NO_WHEEL:
        match = pattern.search(text)
        if match:
            return (f"{match[1]} has no wheel for {target.describe()}; the oci builder installs "
                    "wheels only: use the docker builder (builder: docker) to build it from source")
    match = _NOT_FOUND.search(text)
    if match:
        return f"no package named {match[1]} was found in the package index"
    errors = [line.strip() for line in output if line.strip().startswith(("error:", "cause:"))]
    return "installing the requirements failed: " + ("; ".join(errors) or (output or ["uv failed"])[-1])


def _rewrite_shebangs(bin_dir: Path) -> None:
    # uv writes the worker's own interpreter into console scripts; the image's python3 runs them.
    if not bin_dir.is_dir():
        return
    for script in bin_dir.iterdir():
        if not script.is_file():
            continue
        data = script.read_bytes()
        if data.startswith(b"#!"):
            first, _, rest = data.partition(b"\n")
            if b"python" in first:
                script.write_bytes(b"#!/usr/bin/env python3\n" + rest)
