"""Limits on the docker builder's RUN steps, which run a tenant's code in the engine.

The engine's build API takes a memory limit (enforced by the kernel from a step's first
instruction) but no limit on processes, disk or time. Those are held here, by a thread that
follows the build. It learns the build's step containers from the engine's own events
(``create``), never from the build's output, which the tenant's steps write into too: a new
container is the build's when its host config carries the build's marker, a ``/dev/shm``
size with a random part that the engine gives every step container of that build and no
other. The thread sets its process limit (``docker update``), then every ``interval``
seconds reads the CPU time it used and how long the steps have run, and less often what it
has written (its ``SizeRw``: each step's writes stay in the image, so they add up over the
build), and kills it when it passes a limit. The step then fails, and ``breach`` says which
limit, for the build error. The engine's ``oom`` events name a memory limit hit. A watch
that cannot watch (its engine calls keep failing, or it died) fails the build too.

A process limit set a moment after the container started leaves a window of a few
milliseconds: the memory limit bounds what a fork bomb can start in it, and the watch
kills a container found at its process limit.
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
from typing import Self

import docker
import requests

__all__ = ["RUNNING_IN", "RunLimits", "RunStepWatch"]

logger = logging.getLogger(__name__)

# The legacy builder's line for each RUN step's container: only a hint to look now.
RUNNING_IN = re.compile(r"^ ---> Running in [0-9a-f]{12,64}\s*$")
_MB = 1024 * 1024
# /dev/shm's size, 64 MB (the engine's default) plus a random part per build (never 0).
_SHM_BYTES = 64 * _MB
_SHM_MARKER_RANGE = 1 << 24
_SIZE_EVERY = 2.0  # seconds between two SizeRw reads (the engine walks the whole layer)
_MIN_PAUSE = 0.05  # between two looks, however often the output says "Running in"
_FAILED_LOOKS = 20  # looks in a row that fail before the watch gives up (and the build)
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


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

    Use as a context manager around reading the build's stream; pass ``shm_marker`` to the
    build as its ``shmsize``, and each output line to ``saw`` (a "Running in" line makes the
    watch look at once). ``breach`` is the limit a step passed (a sentence), or None.
    """

    def __init__(self, client: Callable[[], docker.APIClient], limits: RunLimits, interval: float = 0.5) -> None:
        self._client = client  # its own client: the build's is busy streaming
        self.limits = limits
        self.interval = interval
        self.breach: str | None = None
        self.shm_marker = _SHM_BYTES + 1 + secrets.randbelow(_SHM_MARKER_RANGE)
        self._current: str | None = None  # full id of the step container being watched
        self._seen: set[str] = set()  # every step container of this build
        self._looked_at: set[str] = set()  # every container created since the build began
        self._events_since = int(time.time()) - 1
        self._written_before = 0  # bytes the finished steps wrote, as last seen
        self._written_now = 0  # bytes the current step has written, as last seen
        self._size_read_at = 0.0
        self._peak_pids = 0
        self._cpu_before = 0.0  # CPU seconds the finished steps used
        self._cpu_now = 0.0  # the current step's, as last seen
        self._step_started: float | None = None
        self._run_seconds = 0.0  # the finished steps' time
        self._failed_looks = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-step-watch", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive() and self.breach is None:
            self.breach = "the RUN steps' limits could not be watched (the engine did not answer)"

    def saw(self, line: str) -> None:
        """A line of the build's output; one saying a step starts makes the watch look now."""
        if RUNNING_IN.match(line):
            self._wake.set()

    @property
    def reached_process_limit(self) -> bool:
        return self._peak_pids >= self.limits.pids

    def _run(self) -> None:
        try:
            with self._client() as api:
                while not self._stop.is_set():
                    self._look(api)
                    self._wake.wait(self.interval)
                    self._wake.clear()
                    self._stop.wait(_MIN_PAUSE)
                with suppress(*_ENGINE_ERRORS):
                    self._new_containers(api)  # the last oom events
        except Exception as exc:  # a watch that died must not let the build go unwatched
            logger.exception("build.run_watch_failed")
            self.breach = self.breach or (f"the RUN steps' limits could not be watched ({type(exc).__name__})")
            self._kill_current()

    def _look(self, api: docker.APIClient) -> None:
        try:
            self._new_containers(api)
            if self._current is not None:
                self._check(api, self._current)
        except _ENGINE_ERRORS as exc:
            self._failed_looks += 1
            if self._failed_looks >= _FAILED_LOOKS:
                raise RuntimeError(f"{_FAILED_LOOKS} looks failed: {exc}") from exc
        else:
            self._failed_looks = 0

    def _new_containers(self, api: docker.APIClient) -> None:
        """Take up a step container of this build the engine created since the last look,
        and note the memory limit hit by one (an ``oom`` event)."""
        until = int(time.time()) + 1
        events = list(
            api.events(
                since=self._events_since,
                until=until,
                decode=True,
                filters={"type": "container", "event": ["create", "oom"]},
            )
        )
        self._events_since = until - 2  # overlap: an event of the last second may come late
        for event in events:
            cid = str(event.get("id") or event.get("Actor", {}).get("ID") or "")
            action = event.get("Action") or event.get("status")
            if action == "oom" and cid in self._seen:
                self.breach = self.breach or (
                    f"a RUN step ran out of its memory limit of {self.limits.memory_mb} MB (MMS_BUILD_RUN_MEMORY_MB)"
                )
            if action != "create" or cid in self._looked_at:
                continue
            self._looked_at.add(cid)
            try:
                found = api.inspect_container(cid)
            except docker.errors.NotFound:
                continue  # a step that ended before this look (or another build's container)
            if (found.get("HostConfig") or {}).get("ShmSize") == self.shm_marker:
                self._take(api, cid)

    def _take(self, api: docker.APIClient, cid: str) -> None:
        # PidsLimit through the update API: docker-py's update_container lacks it.
        api._raise_for_status(
            api._post_json(api._url("/containers/{0}/update", cid), data={"PidsLimit": self.limits.pids})
        )
        self._end_step()
        self._current = cid
        self._seen.add(cid)
        self._step_started = time.monotonic()
        self._size_read_at = 0.0  # read its size at the first look

    def _end_step(self) -> None:
        """The current step is over: what it wrote and used joins the finished steps'."""
        self._written_before += self._written_now
        self._written_now = 0
        self._cpu_before += self._cpu_now
        self._cpu_now = 0.0
        if self._step_started is not None:
            self._run_seconds += time.monotonic() - self._step_started
        self._step_started = None
        self._current = None

    def _check(self, api: docker.APIClient, cid: str) -> None:
        try:
            one_shot = True if docker.utils.version_gte(api.api_version, "1.41") else None
            stats = api.stats(cid, stream=False, one_shot=one_shot)
        except docker.errors.NotFound:  # the step ended and the engine removed its container:
            self._end_step()  # its time stops counting (a COPY of the models may follow)
            return
        pids = int((stats.get("pids_stats") or {}).get("current") or 0)
        self._peak_pids = max(self._peak_pids, pids)
        used = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0
        self._cpu_now = max(self._cpu_now, used / 1e9)  # nanoseconds
        elapsed = self._run_seconds + (time.monotonic() - self._step_started if self._step_started is not None else 0.0)
        reason = None
        if elapsed > self.limits.seconds:
            reason = (
                f"the RUN steps ran longer than their time limit of {self.limits.seconds} s (MMS_BUILD_RUN_SECONDS)"
            )
        elif self._cpu_before + self._cpu_now > self.limits.cpu_seconds:
            reason = (
                f"the RUN steps used more than their CPU time limit of "
                f"{self.limits.cpu_seconds} s (MMS_BUILD_RUN_CPU_SECONDS)"
            )
        elif pids and pids >= self.limits.pids:  # a fork bomb waits there for ever
            reason = self._process_limit_reason()
        elif time.monotonic() - self._size_read_at >= _SIZE_EVERY:
            self._size_read_at = time.monotonic()
            found = api.containers(all=True, size=True, filters={"id": cid})
            if found:
                self._written_now = int(found[0].get("SizeRw") or 0)
            if self._written_before + self._written_now > self.limits.disk_mb * _MB:
                reason = (
                    f"the RUN steps wrote more than their disk limit of "
                    f"{self.limits.disk_mb} MB (MMS_BUILD_RUN_DISK_MB)"
                )
        if reason:
            self._kill(api, cid, reason)

    def _process_limit_reason(self) -> str:
        return f"a RUN step reached its process limit of {self.limits.pids} processes and threads (MMS_BUILD_RUN_PIDS)"

    def _kill(self, api: docker.APIClient, cid: str, reason: str) -> None:
        if self.breach is None:
            self.breach = reason
        logger.warning("build.run_limit", extra={"container": cid[:12], "detail": reason})
        with suppress(docker.errors.APIError):
            api.kill(cid)

    def _kill_current(self) -> None:
        if self._current is None:
            return
        with suppress(*_ENGINE_ERRORS), self._client() as api:
            api.kill(self._current)

    def check_image(self, api: docker.APIClient, image_id: str, base: str, context_bytes: int) -> None:
        """Fail a build whose RUN steps wrote more than the disk limit in all, counted from
        the image they made (a step can write that much between two looks at it): its size
        less its base's and less the build context the worker wrote."""
        written = int(api.inspect_image(image_id)["Size"]) - int(api.inspect_image(base)["Size"]) - context_bytes
        if written > self.limits.disk_mb * _MB:
            self.breach = self.breach or (
                f"the RUN steps wrote {written // _MB} MB, more than their disk limit of "
                f"{self.limits.disk_mb} MB (MMS_BUILD_RUN_DISK_MB)"
            )

    def failure_reason(self, exit_code: int | None = None) -> str | None:
        """Why a failed step failed, when a limit explains it."""
        if self.breach:
            return self.breach
        if self.reached_process_limit:
            return self._process_limit_reason()
        if exit_code == 137:  # SIGKILL, and not by the watch: the kernel's OOM killer, surely
            return (
                f"a RUN step was killed (exit code 137), most likely by its memory limit "
                f"of {self.limits.memory_mb} MB (MMS_BUILD_RUN_MEMORY_MB)"
            )
        return None
