"""Limits on the docker builder's RUN steps, which run a tenant's code in the engine.

The engine's build API takes a memory limit (enforced by the kernel from a step's first
instruction) but no limit on processes, disk or time. Those are held here, by a thread
that follows the build: the engine names each step's container in its output ("Running in
<id>"), and once the container is known to be this build's (its host config carries the
build's marker), the thread sets its process limit (``docker update``), then every
``interval`` seconds looks at what it has written (its ``SizeRw``: each step's writes stay
in the image, so they add up over the build), the CPU time it used and how long the steps
have run, and kills it when it passes a limit. The step then fails, and ``breach`` says
which limit, for the build error. The engine's ``oom`` events name a memory limit hit.

A process limit set a moment after the container started leaves a window of a few
milliseconds: the memory limit bounds what a fork bomb can start in it, and the watch
kills a container found above its process limit.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import docker
import requests

__all__ = ["RUNNING_IN", "RunLimits", "RunStepWatch"]

logger = logging.getLogger(__name__)

# The legacy builder's line for each RUN step's container.
RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})\s*$")
_MB = 1024 * 1024
# /dev/shm's size, 64 MB (the engine's default) plus a random part per build: the engine puts
# it in the host config of each of the build's step containers, and no other container's.
_SHM_BYTES = 64 * _MB
_SHM_MARKER_RANGE = 1 << 24


@dataclass(frozen=True)
class RunLimits:
    """What the RUN steps of one build may use (``MMS_BUILD_RUN_*``)."""

    memory_mb: int = 4096  # each step, swap included
    pids: int = 1024  # processes and threads of each step
    disk_mb: int = 10240  # written by all steps together
    seconds: int = 1800  # all steps together, wall time
    cpu_seconds: int = 3600  # all steps together, CPU time

    def build_api_limits(self) -> dict[str, int]:
        """The engine's own limits for the build API's ``container_limits``."""
        return {"memory": self.memory_mb * _MB, "memswap": self.memory_mb * _MB}


class RunStepWatch:
    """Follows one build's RUN step containers; kills one that passes a limit.

    Use as a context manager around reading the build's stream, and call ``saw(line)`` with
    each line of it. ``breach`` is the limit a step passed (a sentence), or None; a memory
    limit hit shows there too once the engine reports it.
    """

    def __init__(self, client: Callable[[], docker.APIClient], limits: RunLimits,
                 interval: float = 0.5) -> None:
        self._client = client  # its own client: the build's is busy streaming
        self.limits = limits
        self.interval = interval
        self.breach: str | None = None
        # The tenant's steps print into the same output as the engine, so a "Running in"
        # line only names a candidate: it is watched once its host config carries this
        # build's marker, which the tenant cannot know (it is never printed).
        self.shm_marker = _SHM_BYTES + secrets.randbelow(_SHM_MARKER_RANGE)
        self._lock = threading.Lock()
        self._candidates: list[str] = []
        self._current: str | None = None  # full id of the step container being watched
        self._pids_set: str | None = None
        self._seen: list[str] = []  # every step container of this build (full ids)
        self._written_before = 0  # bytes the finished steps wrote (their layers)
        self._written_now = 0  # bytes the current step has written, as last seen
        self._peak_pids = 0
        self._cpu_before = 0.0  # CPU seconds the finished steps used
        self._cpu_now = 0.0  # the current step's, as last seen
        self._step_started: float | None = None
        self._run_seconds = 0.0  # the finished steps' time
        self._events_since = int(time.time())
        self._stop = threading.Event()
        self._wake = threading.Event()  # a candidate to look at now
        self._thread = threading.Thread(target=self._run, name="run-step-watch", daemon=True)

    def __enter__(self) -> RunStepWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def saw(self, line: str) -> None:
        """A line of the build's output: one naming a step's container makes it a candidate."""
        match = RUNNING_IN.match(line)
        if match:
            with self._lock:
                self._candidates.append(match[1])
            self._wake.set()

    def _take_candidates(self, api: docker.APIClient) -> None:
        with self._lock:
            candidates, self._candidates = self._candidates, []
        for candidate in candidates:
            try:
                found = api.inspect_container(candidate)
            except docker.errors.NotFound:
                continue  # a step that ended before this look, or no container at all
            if (found.get("HostConfig") or {}).get("ShmSize") != self.shm_marker:
                logger.warning("build.run_watch_foreign", extra={"container": candidate[:12]})
                continue  # a line the tenant printed, naming another container
            now = time.monotonic()
            with self._lock:
                self._written_before += self._written_now
                self._written_now = 0
                self._cpu_before += self._cpu_now
                self._cpu_now = 0.0
                self._current = found["Id"]
                self._seen.append(found["Id"])
                if self._step_started is not None:
                    self._run_seconds += now - self._step_started
                self._step_started = now

    @property
    def reached_process_limit(self) -> bool:
        return self._peak_pids >= self.limits.pids

    def _run(self) -> None:
        try:
            api = self._client()
        except docker.errors.DockerException as exc:
            logger.warning("build.run_watch_failed", extra={"detail": str(exc)})
            return
        with api:
            while not self._stop.is_set():
                with suppress(docker.errors.APIError, requests.exceptions.RequestException):
                    self._take_candidates(api)
                    if self._current is not None:
                        self._check(api, self._current)
                self._wake.wait(self.interval)
                self._wake.clear()
            with suppress(docker.errors.APIError, requests.exceptions.RequestException):
                self._note_oom(api)

    def _check(self, api: docker.APIClient, cid: str) -> None:
        if self._pids_set != cid:
            # PidsLimit through the update API: docker-py's update_container lacks it.
            api._raise_for_status(api._post_json(api._url("/containers/{0}/update", cid),
                                                 data={"PidsLimit": self.limits.pids}))
            self._pids_set = cid
        found = api.containers(all=True, size=True, filters={"id": cid})
        if not found:
            return  # the step ended and the engine removed its container
        with self._lock:
            if cid == self._current:
                self._written_now = int(found[0].get("SizeRw") or 0)
            written = self._written_before + self._written_now
        self._note_stats(api, cid)
        cpu = self._cpu_before + self._cpu_now
        elapsed = self._run_seconds + time.monotonic() - (self._step_started or time.monotonic())
        if written > self.limits.disk_mb * _MB:
            self._kill(api, cid, f"the RUN steps wrote more than their disk limit of "
                                 f"{self.limits.disk_mb} MB (MMS_BUILD_RUN_DISK_MB)")
        elif elapsed > self.limits.seconds:
            self._kill(api, cid, f"the RUN steps ran longer than their time limit of "
                                 f"{self.limits.seconds} s (MMS_BUILD_RUN_SECONDS)")
        elif cpu > self.limits.cpu_seconds:
            self._kill(api, cid, f"the RUN steps used more than their CPU time limit of "
                                 f"{self.limits.cpu_seconds} s (MMS_BUILD_RUN_CPU_SECONDS)")
        elif self._peak_pids >= self.limits.pids:  # a fork bomb waits there for ever
            self._kill(api, cid, self._process_limit_reason())
        self._note_oom(api)

    def _note_stats(self, api: docker.APIClient, cid: str) -> None:
        one_shot = True if docker.utils.version_gte(api.api_version, "1.41") else None
        stats = api.stats(cid, stream=False, one_shot=one_shot)
        self._peak_pids = max(self._peak_pids, int((stats.get("pids_stats") or {}).get("current") or 0))
        used = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0
        with self._lock:
            if cid == self._current:
                self._cpu_now = used / 1e9  # nanoseconds

    def _note_oom(self, api: docker.APIClient) -> None:
        if self.breach:
            return
        now = int(time.time()) + 1
        for event in api.events(since=self._events_since, until=now, decode=True,
                                filters={"type": "container", "event": "oom"}):
            if event.get("id") in self._seen:
                self.breach = (f"a RUN step ran out of its memory limit of "
                               f"{self.limits.memory_mb} MB (MMS_BUILD_RUN_MEMORY_MB)")

    def _process_limit_reason(self) -> str:
        return (f"a RUN step reached its process limit of {self.limits.pids} processes and "
                "threads (MMS_BUILD_RUN_PIDS)")

    def _kill(self, api: docker.APIClient, cid: str, reason: str) -> None:
        if self.breach is None:
            self.breach = reason
        logger.warning("build.run_limit", extra={"container": cid[:12], "detail": reason})
        with suppress(docker.errors.APIError):
            api.kill(cid)

    def check_layers(self, api: docker.APIClient, image_id: str, base: str) -> None:
        """Fail a build whose RUN steps wrote more than the disk limit in all, counted from
        the layers they left: a step can write that much between two looks at it."""
        ours = api.history(image_id)[:-len(api.history(base)) or None]  # newest first
        # COPY, ENV, LABEL … show as "#(nop)"; every other layer is a RUN step's.
        written = sum(int(layer.get("Size") or 0) for layer in ours
                      if "#(nop)" not in (layer.get("CreatedBy") or ""))
        if written > self.limits.disk_mb * _MB:
            self.breach = self.breach or (
                f"the RUN steps wrote {written // _MB} MB, more than their disk limit of "
                f"{self.limits.disk_mb} MB (MMS_BUILD_RUN_DISK_MB)")

    def failure_reason(self) -> str | None:
        """Why a failed step failed, when a limit explains it."""
        if self.breach:
            return self.breach
        if self.reached_process_limit:
            return self._process_limit_reason()
        return None
