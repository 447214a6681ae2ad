"""Conda environments without a container: a conda file's packages, solved and installed by
py-rattler (the library behind pixi) for the image's platform, into a prefix that becomes one
layer of the image (``/opt/mms/conda``).

What is read from where: the conda file names channels only by the names the operator
allows (MMS_CONDA_CHANNELS); each maps to the URL the settings give it (a mirror on a closed
network), and every http(s) channel's host passes the fetcher's address rules (a private
address needs MMS_FETCH_ALLOW_HOSTS) before rattler connects. Every package the solve picks
must come from under one of those channel URLs (repodata can name another base URL): any
other is refused before a byte of it is downloaded.

Nothing a package carries is run: rattler links files and patches their prefix placeholders;
post-link and pre-unlink scripts are never executed (``execute_link_scripts=False``, which the
tests prove). The prefix is made in the build's scratch folder, its placeholders patched for
``/opt/mms/conda``, and scrubbed of what names the worker (its package cache) before it is
layered, so the same packages give the same layer on any worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import platform
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from app.package_sources import NO_DEFAULTS, conda_channel_urls
from workers.build_context import InvalidBuildSpec, conda_python_allows, split_conda
from workers.builders import BuildFailed, Log
from workers.fetcher import FetchError, FetchPolicy, check_url
from workers.oci.layers import LayerBuilder

__all__ = ["PREFIX", "CondaEnv", "conda_specs", "install_conda_env", "subdir_for"]

PREFIX = "/opt/mms/conda"
_SUBDIRS = {"amd64": "linux-64", "arm64": "linux-aarch64", "ppc64le": "linux-ppc64le"}
_ARCHSPEC = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "linux-ppc64le": "ppc64le"}
_NUMBERS = re.compile(r"\d+(?:\.\d+)*")
# What an installed package's record says about the worker, not the image: dropped.
_WORKER_FIELDS = ("extracted_package_dir", "package_tarball_full_path")


@dataclass(frozen=True)
class CondaEnv:
    """An installed conda environment, ready to layer."""

    layer: LayerBuilder
    packages: tuple[str, ...]  # name==version=build, for the log and the history
    python: str | None  # the version of the environment's own python package, if it has one

    @property
    def interpreter(self) -> str | None:
        if self.python is None:
            return None
        major_minor = ".".join(self.python.split(".")[:2])
        return f"{PREFIX}/bin/python{major_minor}"


def subdir_for(architecture: str) -> str:
    """The conda platform of an image architecture (the config's ``architecture``)."""
    try:
        return _SUBDIRS[architecture]
    except KeyError:
        raise BuildFailed(
            "environment",
            f"conda packages for a {architecture!r} base image are not supported (only {', '.join(_SUBDIRS)})",
        ) from None


def conda_specs(text: str, base_python: str) -> list[str]:
    """The conda file's packages for conda to install, [] when the base image's Python and pip
    serve it all (a ``python`` entry it satisfies, and ``pip:``)."""
    python_spec, conda_only, _pip = split_conda(text)
    if not conda_only and (python_spec is None or conda_python_allows(python_spec, base_python)):
        return []
    return [*conda_only, *([f"python {python_spec}".strip()] if python_spec else [])]


def _channels(text: str, allowed: list[str], specs: list[str]) -> tuple[list[str], list[str]]:
    """(channel URLs in the file's order, or the operator's; specs with a ``channel::`` prefix
    pointing at that channel's URL)."""
    urls = conda_channel_urls(allowed)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidBuildSpec(f"conda file is not valid YAML: {exc}") from None
    named = doc.get("channels") if isinstance(doc, dict) else None
    if named is not None and not isinstance(named, list):
        raise InvalidBuildSpec("conda file: 'channels' must be a list")

    def url_of(name: str) -> str:
        try:
            return urls[name.strip().rstrip("/")]
        except KeyError:
            raise BuildFailed(
                "environment",
                f"conda file: channel {name.split('?')[0][:80]!r} is not one of the operator's "
                f"({', '.join(sorted(urls)) or 'none'}; MMS_CONDA_CHANNELS)",
            ) from None

    sources = [url_of(str(c)) for c in named or [] if str(c) != NO_DEFAULTS] or list(urls.values())
    rewritten = []
    for spec in specs:
        channel, sep, rest = spec.partition("::")
        if sep:
            url = url_of(channel)
            if url not in sources:
                sources.append(url)
            spec = f"{url}::{rest.strip()}"
        rewritten.append(spec)
    if not sources:
        raise BuildFailed("environment", "conda packages need a channel and MMS_CONDA_CHANNELS names none")
    return list(dict.fromkeys(sources)), rewritten


def _check_sources(sources: list[str], policy: FetchPolicy | None) -> None:
    for url in sources:
        scheme = url.partition("://")[0].lower()
        if scheme in ("http", "https"):
            if policy is None:
                continue
            try:
                check_url(url, policy=policy)
            except FetchError as exc:
                raise BuildFailed("environment", f"conda channel {_shown(url)}: {exc}") from None
        elif scheme != "file":
            raise BuildFailed("environment", f"conda channel {_shown(url)}: only http(s) and file channels are read")


def _shown(url: str) -> str:
    # A mirror URL may carry a token: its scheme, host and path only.
    return re.sub(r"//[^/@]*@", "//", url.split("?", 1)[0])


def _virtual_packages(subdir: str, glibc: str) -> list[Any]:
    """What the image's platform offers a package that asks (``__glibc >=2.17``): the base's
    glibc, this kernel (images run on hosts like the worker) and the architecture."""
    import rattler

    def package(name: str, version: str, build: str = "0") -> Any:
        return rattler.GenericVirtualPackage(
            rattler.PackageName(name), rattler.Version(version), rattler.BuildString(build)
        )

    kernel = _NUMBERS.match(platform.release())
    found = [package("__unix", "0"), package("__linux", kernel.group() if kernel else "0")]
    if glibc:
        found.append(package("__glibc", glibc))
    found.append(package("__archspec", "1", _ARCHSPEC.get(subdir, "0")))
    return found


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run rattler's coroutine to its end, also from a thread that has an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def install_conda_env(
    text: str,
    specs: list[str],
    *,
    channels: list[str],
    subdir: str,
    glibc: str,
    work: Path,
    cache_dir: Path,
    emit: Log,
    policy: FetchPolicy | None = None,
    timeout: float = 1800.0,
) -> CondaEnv:
    """Solve ``specs`` (from the conda file ``text``) on the allowed ``channels`` for
    ``subdir`` and install them into a prefix under ``work``; BuildFailed says what failed."""
    import rattler
    from rattler.exceptions import SolverError

    sources, specs = _channels(text, channels, specs)
    _check_sources(sources, policy)
    client = rattler.Client.default_client(max_retries=3, timeout=int(timeout))
    gateway = rattler.Gateway(cache_dir=cache_dir / "repodata", client=client)
    started = time.monotonic()
    emit(f"mms: conda: solving {', '.join(specs)} for {subdir} on {', '.join(_shown(s) for s in sources)}")
    try:
        records = _run(
            rattler.solve(
                sources,
                specs,
                gateway=gateway,
                platforms=[subdir, "noarch"],
                virtual_packages=_virtual_packages(subdir, glibc),
                timeout=None,
            )
        )
    except SolverError as exc:
        why = _one_line(exc)
        raise BuildFailed("environment", f"conda: the conda file's packages cannot be installed: {why}") from None
    except Exception as exc:  # noqa: BLE001 - rattler's errors (fetching, parsing) have no common base
        raise BuildFailed("environment", f"conda: {type(exc).__name__}: {_one_line(exc)}") from None
    roots = [s.rstrip("/") + "/" for s in sources]
    for record in records:
        if not any(str(record.url).startswith(root) for root in roots):
            raise BuildFailed(
                "environment",
                f"conda: {record.name.normalized} would be downloaded from {_shown(str(record.url))}, "
                "outside the channels it was solved on",
            )
    packages = tuple(sorted(f"{r.name.normalized}=={r.version}={r.build}" for r in records))
    emit(f"mms: conda: solved {len(records)} package(s) in {time.monotonic() - started:.1f} s: {' '.join(packages)}")
    prefix = work / "conda-prefix"
    started = time.monotonic()
    try:
        _run(
            rattler.install(
                records,
                prefix,
                cache_dir=cache_dir / "pkgs",
                platform=rattler.Subdir(subdir),
                execute_link_scripts=False,  # a package's scripts never run on the worker
                show_progress=False,
                client=client,
                alternative_target_prefix=PREFIX,
            )
        )
    except Exception as exc:  # noqa: BLE001 - as above
        raise BuildFailed("environment", f"conda: installing failed: {type(exc).__name__}: {_one_line(exc)}") from None
    _scrub(prefix)
    python = next((str(r.version) for r in records if r.name.normalized == "python"), None)
    env = CondaEnv(LayerBuilder(), packages, python)
    if env.interpreter and not (prefix / env.interpreter.removeprefix(f"{PREFIX}/")).exists():
        raise BuildFailed("environment", f"conda: the python package has no {env.interpreter}")
    env.layer.add_prefix(prefix, PREFIX)
    emit(f"mms: conda: installed into {PREFIX} in {time.monotonic() - started:.1f} s")
    return env


def _scrub(prefix: Path) -> None:
    """Drop what names the worker rather than the image (the package cache's paths in each
    record, rattler's cache tag) and any login in a channel URL."""
    (prefix / "CACHEDIR.TAG").unlink(missing_ok=True)
    for record in sorted((prefix / "conda-meta").glob("*.json")):
        data = json.loads(record.read_text())
        for field in _WORKER_FIELDS:
            data.pop(field, None)
        if isinstance(data.get("link"), dict):
            data["link"].pop("source", None)
        for field in ("url", "channel"):  # a mirror's login stays out of the image
            if isinstance(data.get(field), str):
                data[field] = _shown(data[field])
        record.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:599] + "…"
