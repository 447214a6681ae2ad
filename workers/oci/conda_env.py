"""Conda environments without a container: a conda file's packages, solved by py-rattler (the
library behind pixi) for the image's platform, installed contained into a prefix that becomes
one layer of the image (``/opt/mms/conda``).

What is read from where: the conda file names channels only by the names the operator
allows (MMS_CONDA_CHANNELS); each maps to the URL the settings give it (a mirror on a closed
network), and every http(s) channel's host passes the fetcher's address rules (a private
address needs MMS_FETCH_ALLOW_HOSTS) before rattler reads its repodata. The solve stays in
the worker; its records only say what to fetch. Every package archive is then downloaded by
the service's own fetcher (``conda_archives``: from under one of the channel URLs only, pinned
to the checked address, bounded) and checked against the record's sha256 (md5 when only that
is given) before anything reads it.

Nothing a package carries touches the worker: the archives are unpacked and linked by
rattler in the sandbox (``workers.sandbox``, ``conda_link``: no network, none of the
worker's files, an output tmpfs of the sandbox's disk limit, its file size, process, CPU and
wall-time limits), post-link and pre-unlink scripts never run (``execute_link_scripts=False``).
The worker copies the prefix out (files as bytes, links as links never followed, anything
else refused), scrubs what names the sandbox from the records, and layers it, so the same
packages give the same layer on any worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from app.package_sources import NO_DEFAULTS, conda_channel_urls
from workers.build_context import InvalidBuildSpec, conda_python_allows, split_conda
from workers.builders import BuildFailed, Log
from workers.fetcher import FetchError, FetchPolicy, Resolver, check_url
from workers.oci import conda_link
from workers.oci.conda_archives import Archive, download_archives, stage
from workers.oci.layers import LayerBuilder
from workers.sandbox import Limits, SandboxFailed, run_contained

__all__ = ["PREFIX", "CondaEnv", "EnvironmentCache", "conda_specs", "install_conda_env", "subdir_for"]

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


def _check_sources(sources: list[str], policy: FetchPolicy | None, resolver: Resolver) -> None:
    for url in sources:
        scheme = url.partition("://")[0].lower()
        if scheme in ("http", "https"):
            if policy is None:
                continue
            try:
                check_url(url, policy=policy, resolver=resolver)
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
    limits: Limits = Limits(),
    resolver: Resolver = socket.getaddrinfo,
    environments_kept: int = 4,
) -> CondaEnv:
    """Solve ``specs`` (from the conda file ``text``) on the allowed ``channels`` for
    ``subdir``, download the packages with the fetcher and install them contained, within
    ``limits``, into a prefix under ``work``; BuildFailed says what failed. The last
    ``environments_kept`` environments installed are kept under ``cache_dir`` and reused
    when the same packages are solved again (0: none)."""
    import rattler
    from rattler.exceptions import SolverError

    sources, specs = _channels(text, channels, specs)
    _check_sources(sources, policy, resolver)
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
    packages = tuple(sorted(f"{r.name.normalized}=={r.version}={r.build}" for r in records))
    emit(f"mms: conda: solved {len(records)} package(s) in {time.monotonic() - started:.1f} s: {' '.join(packages)}")
    python = next((str(r.version) for r in records if r.name.normalized == "python"), None)
    kept = EnvironmentCache(cache_dir / "environments", keep=environments_kept)
    key = kept.key(records, subdir) if environments_kept else None
    cached = kept.get(key) if key else None
    if cached is not None:
        emit(f"mms: conda: the same {len(records)} package(s) were installed by this worker before: reused")
        return _layered(cached, packages, python)
    started = time.monotonic()
    archives = download_archives(
        records,
        [s.rstrip("/") + "/" for s in sources],
        cache=cache_dir / "archives",
        policy=policy if policy is not None else _channel_policy(sources),
        resolver=resolver,
        shown=_shown,
    )
    emit(f"mms: conda: {len(archives)} archive(s) downloaded and checked in {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    # Made where it is kept when it will be (no copy afterwards), else in the build's scratch.
    prefix = kept.staging() / "prefix" if key else work / "conda-prefix"
    try:
        _install_contained(archives, subdir, work, prefix, limits, emit)
        _scrub(prefix, {str(a.record.file_name): a.record for a in archives})
        env = CondaEnv(LayerBuilder(), packages, python)
        # lexists: the interpreter may be a link to the base image's; the worker's files say nothing.
        if env.interpreter and not os.path.lexists(prefix / env.interpreter.removeprefix(f"{PREFIX}/")):
            raise BuildFailed("environment", f"conda: the python package has no {env.interpreter}")
        if key:
            prefix = kept.commit(key, prefix.parent)
    except BaseException:
        if key:
            shutil.rmtree(prefix.parent, ignore_errors=True)
        raise
    emit(f"mms: conda: installed into {PREFIX} in {time.monotonic() - started:.1f} s, contained")
    env.layer.add_prefix(prefix, PREFIX)
    return env


def _layered(prefix: Path, packages: tuple[str, ...], python: str | None) -> CondaEnv:
    env = CondaEnv(LayerBuilder(), packages, python)
    env.layer.add_prefix(prefix, PREFIX)
    return env


# What decides an installed environment's every byte besides its archives: the code that
# installs and scrubs it (these two files) and the installer's release.
_INSTALLER = hashlib.sha256(Path(__file__).read_bytes() + Path(conda_link.__file__).read_bytes()).hexdigest()


class EnvironmentCache:
    """Environments this worker installed, kept so that a build of the same packages (a new
    model version, another score.py) skips the download and the contained install.

    Keyed by each archive's sha256 and the URL and channel it came from (both written into
    conda-meta), the platform and the installer's code: the same key is the same bytes, whichever
    account asked. Only environments whose every record has a sha256 are kept (an md5 can be
    forged to match). An entry is a folder renamed into place whole, so a reader never sees one
    half made; the least recently used beyond ``keep`` are removed once they have not been used
    for two hours (longer than a build may run: one still layering an entry has used it since
    it started)."""

    def __init__(self, root: Path, keep: int, idle_seconds: float = 2 * 3600.0) -> None:
        self.root, self.keep, self.idle_seconds = root, keep, idle_seconds

    def key(self, records: list[Any], subdir: str) -> str | None:
        if any(not r.sha256 for r in records):
            return None
        import rattler

        facts = {
            "installer": _INSTALLER,
            "rattler": getattr(rattler, "__version__", ""),
            "subdir": subdir,
            "prefix": PREFIX,
            "records": sorted(
                [str(r.file_name), r.sha256.hex(), _shown(str(r.url)), _shown(str(r.channel))] for r in records
            ),
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Path | None:
        entry = self.root / key
        if not (entry / "prefix").is_dir():
            return None
        os.utime(entry)  # used now: not the next one removed
        return entry / "prefix"

    def staging(self) -> Path:
        """A new folder to make an entry in (``commit`` puts it in place)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".new-", dir=self.root))

    def commit(self, key: str, staging: Path) -> Path:
        """Put the entry made in ``staging`` in place as ``key``; where its prefix now is."""
        try:
            staging.rename(self.root / key)
        except OSError:  # another build kept the same environment first: theirs serves
            shutil.rmtree(staging, ignore_errors=True)
        self._trim(key)
        return self.root / key / "prefix"

    def _trim(self, keeping: str) -> None:
        # Other workers of this machine may share the folder and trim it too: an entry can
        # go while this looks at it.
        used: list[tuple[float, Path]] = []
        for entry in self.root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                used.append((entry.stat().st_mtime, entry))
        kept = sorted(((t, e) for t, e in used if e.name != keeping and not e.name.startswith(".")), reverse=True)
        # Half-made or half-removed entries of a build that stopped midway go too.
        leftovers = [(t, e) for t, e in used if e.name.startswith((".new-", ".old-"))]
        now = time.time()
        for mtime, entry in [*kept[max(self.keep - 1, 0) :], *leftovers]:
            if now - mtime > self.idle_seconds:
                gone = Path(tempfile.mkdtemp(prefix=".old-", dir=self.root))
                with contextlib.suppress(FileNotFoundError):
                    entry.rename(gone / entry.name)
                shutil.rmtree(gone, ignore_errors=True)


def _channel_policy(sources: list[str]) -> FetchPolicy:
    """Without the service's policy (a caller that picks the channels): those channels' hosts
    allowed, still pinned and bounded."""
    hosts = set()
    for url in sources:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and parts.hostname:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            hosts.add(f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}")
    return FetchPolicy(allow_hosts=frozenset(hosts))


def _install_contained(
    archives: list[Archive], subdir: str, work: Path, prefix: Path, limits: Limits, emit: Log
) -> None:
    """Unpack and link ``archives`` in the sandbox (``conda_link``), then take the prefix it
    made into ``prefix``, refusing what no environment may hold."""
    inputs = work / "conda-in"
    shutil.rmtree(inputs, ignore_errors=True)
    channel = inputs / "channel"
    plan: dict[str, Any] = {
        "channel": "/in/channel",
        "subdirs": sorted({str(a.record.subdir) for a in archives}),
        "cache": "/out/pkgs",
        "prefix": "/out/prefix",
        "platform": subdir,
        "target": PREFIX,
        "packages": [],
    }
    indexes: dict[str, dict[str, Any]] = {}
    for archive in archives:
        record = archive.record
        staged = stage(archive, channel)
        entry = json.loads(record.to_json())
        for field in ("url", "channel", "fn"):
            entry.pop(field, None)
        index = indexes.setdefault(str(record.subdir), {"info": {"subdir": str(record.subdir)}})
        kind = "packages.conda" if staged.name.endswith(".conda") else "packages"
        index.setdefault(kind, {})[staged.name] = entry
        plan["packages"].append(
            {
                "label": archive.label,
                "archive": f"/in/channel/{record.subdir}/{staged.name}",
                "entry": f"{record.name.normalized}-{record.version}-{record.build}",
            }
        )
    for name, index in indexes.items():
        (channel / name / "repodata.json").write_text(json.dumps(index))
    (inputs / "plan.json").write_text(json.dumps(plan))
    seen = _Progress(emit)
    script = Path(conda_link.__file__)
    try:
        run_contained(
            [sys.executable, "-I", "/mms/conda_link.py", "/in/plan.json"],
            inputs={inputs: "/in", script: "/mms/conda_link.py"},
            output=work / "conda-out",
            limits=limits,
            log=seen,
            what="installing the conda environment",
            collect=lambda out: _take_prefix(out, prefix),
        )
    except SandboxFailed as exc:
        raise BuildFailed("environment", seen.explain(exc, limits)) from None
    finally:
        shutil.rmtree(inputs, ignore_errors=True)


class _Progress:
    """The sandbox's lines to the build log, keeping which package it was at and its failure."""

    def __init__(self, emit: Log) -> None:
        self.emit = emit
        self.package: str | None = None
        self.failure: dict[str, Any] | None = None

    def __call__(self, line: str) -> None:
        text = line.strip()
        if text.startswith(conda_link.UNPACKING):
            self.package = text.removeprefix(conda_link.UNPACKING)
        elif text == "mms-conda: linking":
            self.package = None
        elif text.startswith("{") and conda_link.FAILED in text:
            try:
                failure = json.loads(text)[conda_link.FAILED]
            except (ValueError, TypeError, KeyError):
                failure = None
            if isinstance(failure, dict):
                self.failure = failure
                return
        self.emit(line)

    def explain(self, exc: SandboxFailed, limits: Limits) -> str:
        failure = self.failure or {}
        what = f"installing {self.package}" if self.package else "linking the environment"
        kind = failure.get("kind")
        if kind == "disk":
            return f"conda: {what} went past the disk limit of {_size(limits.disk_bytes)}"
        if kind == "files":
            return f"conda: {what} went past the limit of {limits.files} files"
        if kind == "path":
            return f"conda: {self.package} has a path that leaves the environment ({failure.get('error')}); refused"
        if kind == "file_size" or "file size limit" in str(exc):
            return f"conda: {what} wrote a file past the file size limit of {_size(limits.file_bytes)}"
        if failure:
            return f"conda: {what} failed: {_one_line(str(failure.get('error', '')))}"
        return f"conda: {what} failed: {str(exc).removeprefix('installing the conda environment failed: ')}"


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


def _take_prefix(out: Path, prefix: Path) -> None:
    """Copy the prefix the sandbox made onto the worker: folders, regular files (their bytes,
    executable or not, never a setuid bit) and symbolic links as links, never followed. A
    device, fifo or socket, or a file linked to one outside the sandbox's output, is refused."""
    made = out / "prefix"
    if made.is_symlink() or not made.is_dir():
        raise BuildFailed("environment", "conda: the contained install made no environment")
    # How often each file appears in the whole output (rattler links the prefix's files to
    # its unpacked packages): a file with more links than that is linked from outside.
    counts: Counter[tuple[int, int]] = Counter()
    for root, _dirs, files in os.walk(out):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                counts[(st.st_dev, st.st_ino)] += 1
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    for root, dirs, files in os.walk(made):
        rel_root = Path(root).relative_to(made)
        for name in sorted([*dirs, *files]):
            source, dest, rel = Path(root, name), prefix / rel_root / name, rel_root / name
            st = source.lstat()
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(source), dest)
            elif stat.S_ISDIR(st.st_mode):
                dest.mkdir(mode=0o755)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > counts[(st.st_dev, st.st_ino)]:
                    raise BuildFailed("environment", f"conda: {rel} is linked to a file outside the environment")
                _copy_file(source, dest, executable=bool(st.st_mode & 0o111))
            else:
                raise BuildFailed(
                    "environment",
                    f"conda: {rel} is a {_kind(st.st_mode)}; an environment holds files, folders and links only",
                )


def _copy_file(source: Path, dest: Path, *, executable: bool) -> None:
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    dest.chmod(0o755 if executable else 0o644)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _scrub(prefix: Path, records: dict[str, Any]) -> None:
    """Drop what names the worker or the sandbox rather than the image (the package cache's
    paths in each record, rattler's cache tag), give each record back the URL and channel
    it came from, without a mirror's login. Never through a link: what the sandbox made
    could point anywhere on the worker."""
    (prefix / "CACHEDIR.TAG").unlink(missing_ok=True)
    meta = prefix / "conda-meta"
    if meta.is_symlink():
        raise BuildFailed("environment", "conda: conda-meta is a link; refused")
    for record in sorted(meta.glob("*.json")):
        if record.is_symlink():
            raise BuildFailed("environment", f"conda: conda-meta/{record.name} is a link; refused")
        data = json.loads(record.read_text())
        for field in _WORKER_FIELDS:
            data.pop(field, None)
        if isinstance(data.get("link"), dict):
            data["link"].pop("source", None)
        source = records.get(str(data.get("fn")))
        if source is not None:
            data["url"], data["channel"] = str(source.url), str(source.channel)
        for field in ("url", "channel"):  # a mirror's login stays out of the image
            if isinstance(data.get(field), str):
                data[field] = _shown(data[field])
        record.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:599] + "…"
