"""Where a build's Python packages may come from: the operator's index, or the account's
own package files. Checked when a manifest is created (when its requirements are one of the
account's assets) and again by the worker when it builds (whatever the manifest names)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml
from packaging.requirements import InvalidRequirement, Requirement

__all__ = [
    "DirectReference",
    "PackageSourceRefused",
    "canonical_requirement",
    "check_conda_channels",
    "check_requirements",
    "conda_channel_urls",
    "conda_pip_entries",
    "parse_requirement",
]


class PackageSourceRefused(ValueError):
    """A requirement line chooses its own package source; the message names the line."""


@dataclass(frozen=True)
class DirectReference:
    """A requirement on a file by URL (``name @ url``), to one of the account's own assets."""

    line: int
    name: str
    url: str


def check_requirements(
    text: str, what: str, *, own_url: Callable[[str], bool] = lambda _: False
) -> list[DirectReference]:
    """Refuse requirement lines that choose where packages come from: options (an index,
    find-links, a nested file), and direct references (a URL, a VCS or a path) other than
    to the account's own assets (``own_url``), which are returned. Package sources are the
    operator's (MMS_PIP_INDEX_URL); a tenant's own line would send the build, and whatever a
    package's build runs, wherever the tenant likes."""
    references = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        shown = line if len(line) <= 80 else line[:79] + "…"
        if line.startswith("-"):
            raise PackageSourceRefused(
                f"{what} line {number} ({shown.split()[0]}): options are not accepted; package "
                "sources are the operator's choice (MMS_PIP_INDEX_URL)"
            )
        try:
            requirement = parse_requirement(line)
        except PackageSourceRefused:
            raise PackageSourceRefused(
                f"{what} line {number} ({_no_query(shown)}): not a requirement such as name==1.0 "
                "(URLs, paths and options, other than --hash=sha256:… after it, are not "
                "accepted)"
            ) from None
        if requirement.url:
            if not own_url(requirement.url):
                raise PackageSourceRefused(
                    f"{what} line {number} ({requirement.name} @ …): direct references are "
                    "accepted only to this account's own assets; upload the file as an asset, "
                    "or name a version from the package index"
                )
            references.append(DirectReference(number, requirement.name, requirement.url))
    return references


def parse_requirement(line: str) -> Requirement:
    """A requirement line: a PEP 508 requirement, then nothing but ``--hash=sha256:<hex>``
    options (pip and uv honour any option after a requirement, an index among them)."""
    hashes = _HASHES.search(line)
    try:
        return Requirement(line[: hashes.start()] if hashes else line)
    except InvalidRequirement:
        raise PackageSourceRefused(f"not a requirement: {_no_query(line)[:80]}") from None


def canonical_requirement(line: str) -> str:
    """The line as the service writes it for an installer: the parsed requirement and its
    hashes, nothing the tenant wrote beyond them."""
    hashes = _HASHES.search(line)
    kept = re.findall(r"sha256:[0-9a-fA-F]{64}", hashes.group()) if hashes else []
    return " ".join([str(parse_requirement(line)), *(f"--hash=sha256:{h[7:].lower()}" for h in kept)])


# Where a channel the settings name only by name is read from (the oci builder; conda in a
# docker build resolves names itself).
CONDA_CHANNEL_ALIAS = "https://conda.anaconda.org"
_WELL_KNOWN_CHANNELS = {"defaults": "https://repo.anaconda.com/pkgs/main"}
# Not a channel: conda's word for "not the default ones", which the service never adds.
NO_DEFAULTS = "nodefaults"


def conda_channel_urls(entries: list[str]) -> dict[str, str]:
    """The operator's channels (MMS_CONDA_CHANNELS), by the name a conda file uses, with
    the URL each is read from: ``conda-forge`` (conda.anaconda.org), ``name=URL`` (a
    mirror under that channel's name, for closed networks), or a URL (named by itself)."""
    channels: dict[str, str] = {}
    for entry in entries:
        entry = entry.strip()
        name, sep, url = entry.partition("=")
        if sep and "://" not in name:
            channels[name.strip()] = url.strip().rstrip("/")
        elif "://" in entry:
            channels[entry.rstrip("/")] = entry.rstrip("/")
        elif entry:
            channels[entry] = _WELL_KNOWN_CHANNELS.get(entry, f"{CONDA_CHANNEL_ALIAS}/{entry}")
    return channels


def check_conda_channels(text: str, allowed: list[str]) -> None:
    """Refuse a conda file whose channels (``channels:``, ``channel::package``) are not the
    operator's (MMS_CONDA_CHANNELS)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return  # the builder says what is wrong with it
    if not isinstance(doc, dict):
        return
    channels = doc.get("channels") or []
    if not isinstance(channels, list):
        raise PackageSourceRefused("conda file: 'channels' must be a list")
    named = [str(c) for c in channels]
    deps = doc.get("dependencies") if isinstance(doc.get("dependencies"), list) else []
    named += [str(d).split("::", 1)[0].strip() for d in deps if isinstance(d, str) and "::" in d]
    names = set(conda_channel_urls(allowed))
    for channel in named:
        if channel != NO_DEFAULTS and channel.rstrip("/") not in names:
            raise PackageSourceRefused(
                f"conda file: channel {_no_query(channel)[:80]!r} is not one of the operator's "
                f"({', '.join(sorted(names)) or 'none'}; MMS_CONDA_CHANNELS)"
            )


def conda_pip_entries(text: str) -> list[str]:
    """The ``pip:`` entries of a conda environment file ([] when it is not one: the builder
    says what is wrong with it)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    deps = doc.get("dependencies") if isinstance(doc, dict) else None
    return (
        [
            str(entry)
            for dep in deps or []
            if isinstance(dep, dict) and isinstance(dep.get("pip"), list)
            for entry in dep["pip"]
        ]
        if isinstance(deps, list)
        else []
    )


_HASHES = re.compile(r"(?:[ \t]+--hash[=\s]sha256:[0-9a-fA-F]{64})+[ \t]*$")


def _no_query(text: str) -> str:
    return re.sub(r"\?\S*", "?…", text)
