"""Image builders: turn a ``BuildSpec`` into a pushed image, streaming progress to a log.

Exceptions::

    BuildFailed          a step failed; str() is the one-line reason shown on the image
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from workers.build_context import BuildSpec

__all__ = ["BuildFailed", "BuildResult", "Builder", "Log", "address_host", "redacting", "scrub"]

Log = Callable[[str], None]  # receives one line of build log at a time, as it happens


@dataclass(frozen=True)
class BuildResult:
    """Where the pushed image lives and what it is."""

    image_location: str  # <registry>/<repo>:<tag>
    digest: str  # the pushed manifest's sha256 digest
    size_bytes: int  # the image's unpacked size in the engine
    base_image_digest: str | None = None
    # Set by the pipeline: Passed, or Skipped with the reason (a failed one fails the build).
    smoke_test: str | None = None
    smoke_test_reason: str | None = None


class BuildFailed(Exception):
    """A build step failed: ``step`` names it, ``message`` is a one-line reason."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


class Builder(Protocol):
    """What every builder offers (docker here; others join behind the same call)."""

    def build_and_push(self, spec: BuildSpec, image_repo: str, tag: str, log: Log) -> BuildResult:
        """Build ``spec``, push it as ``<registry>/<image_repo>:<tag>``, return the result."""
        ...


def address_host(address: str) -> str:
    """The registry host a login's ``address`` names (Docker Hub's aliases as docker.io)."""
    host = re.sub(r"^[a-z]+://", "", address.strip().lower()).split("/", 1)[0]
    return "docker.io" if host in ("index.docker.io", "registry-1.docker.io") else host


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "****")
    return text


def redacting(log: Log, secrets: list[str]) -> Log:
    """Wrap ``log`` so that no secret can reach it, whatever a tool prints."""
    if not secrets:
        return log
    return lambda line: log(scrub(line, secrets))
