"""Start a freshly built image once and check that it serves before the build is called good.

A score.py whose ``init()`` raises makes the scoring server exit before it opens its port,
so the build fails here, with the traceback, instead of at deploy time.

That ``init()`` is a tenant's code, so the container is contained: no network but its own
loopback (``GET /`` is asked from inside, by the image's own python3 through the engine's
exec API), no capabilities and no way to gain any, and limits on memory, processes and
threads, CPU and wall time. A failure caused by a limit names the limit.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress

import docker
import requests
from docker.types import CancellableStream

from workers.build_context import PORT
from workers.builders import BuildFailed, Log
from workers.builders.docker import check_stream, engine_client, registry_host
from workers.containment import contained_host_config

__all__ = ["SmokeTestFailed", "last_error_line", "smoke_test"]

logger = logging.getLogger(__name__)

_TAIL_LINES = 80
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
# What a process or thread refused by the pids limit prints (Python, glibc, shells, the JVM).
_PROCESS_LIMIT_HINTS = (
    "Resource temporarily unavailable",
    "can't start new thread",
    "BlockingIOError",
    "unable to create native thread",
    "fork: retry",
    "Cannot fork",
)
# Run by the image's own python3 inside the container: one GET / on its loopback. -I -S: the
# image's PYTHONPATH and site-packages play no part. Prints a marker the worker looks for.
_PROBE = (
    "import urllib.request as r\n"
    "get = r.build_opener(r.ProxyHandler({{}})).open  # no proxy the image may name\n"
    "try: s = get('http://127.0.0.1:{port}/', timeout=2).status\n"
    "except Exception as e: s = getattr(e, 'code', None) or 0\n"
    "print('mms-probe', s)\n"
)
_PROBE_ANSWER = re.compile(rb"^mms-probe (\d+)\s*$", re.MULTILINE)
# The probe's own processes (runc's exec helpers, then python3) take slots under the pids
# limit while they run, so a fork bomb that filled it settles this far below it.
_PROBE_PIDS = 3
_PROBE_OUTPUT_BYTES = 64 * 1024
_MB = 1024 * 1024


class SmokeTestFailed(Exception):
    """The image did not serve ``GET /``; ``logs`` holds the container's last output."""

    def __init__(self, message: str, logs: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.logs = logs


def smoke_test(
    docker_host: str | None,
    image: str,
    log: Log,
    timeout: float = 60,
    *,
    pull: bool = False,
    pull_auth: Mapping[str, str] | None = None,
    memory_mb: int = 2048,
    pids: int = 512,
    cpus: float = 2.0,
    disk_mb: int = 1024,
) -> None:
    """Run ``image`` until ``GET /`` answers 200; raise if it never does.

    The image is in the engine already (the docker builder), or ``pull`` fetches it first
    (the oci builder pushed it without an engine) and removes it afterwards. ``memory_mb``,
    ``pids`` (processes and threads), ``cpus`` and ``disk_mb`` (what it writes, each file
    and all together) limit the container; ``timeout`` its time.
    """
    started = time.monotonic()
    try:
        api = engine_client(docker_host, timeout=30)
        with api, _pulled(api, image, pull, pull_auth, log):
            cpus = min(cpus, api.info().get("NCPU") or cpus)  # the engine refuses more
            container = api.create_container(
                image,
                # Its own network namespace holds only a loopback, so any port is free.
                environment={"PORT": str(PORT), "HOST": "127.0.0.1"},
                # Unresolvable otherwise (no network, no /etc/hosts entry): the JVM asks.
                hostname="localhost",
                # Each file is capped there; all of them together are watched (_over_disk_limit).
                host_config=contained_host_config(api, memory_mb=memory_mb, pids=pids, cpus=cpus, disk_mb=disk_mb),
                labels={"org.mms.smoke-test": "true"},
            )
            cid = container["Id"]
            try:
                api.start(cid)
                log(
                    f"mms: smoke test: started {image} ({cid[:12]}) without network, limited "
                    f"to {memory_mb} MB, {pids} processes, {cpus:g} CPUs and {disk_mb} MB "
                    f"of disk; waiting for GET / on its port {PORT}"
                )
                _wait_until_serving(api, cid, started + timeout, timeout, memory_mb, pids, disk_mb)
                logs = _tail(api, cid)
            finally:
                api.remove_container(cid, force=True, v=True)  # kills it if still running
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise SmokeTestFailed(f"could not run the image: {exc}") from None
    except SmokeTestFailed as exc:
        log("mms: smoke test failed; the container's last output:")
        for line in exc.logs.splitlines():
            log(f"    {line}")
        log(f"mms: smoke test failed: {exc.message}")
        logger.warning("smoke_test.failed", extra={"image": image})
        raise
    for line in logs.splitlines():
        log(f"    {line}")
    elapsed = time.monotonic() - started
    log(f"mms: smoke test passed: GET / answered 200 after {elapsed:.1f} s")
    logger.info("smoke_test.passed", extra={"image": image, "seconds": round(elapsed, 1)})


@contextmanager
def _pulled(api: docker.APIClient, image: str, pull: bool, auth: Mapping[str, str] | None, log: Log) -> Iterator[None]:
    if not pull:
        yield
        return
    host = registry_host(image)
    config = {**auth, "serveraddress": host} if auth else {}
    log(f"mms: smoke test: pulling {image}")
    try:
        check_stream(
            "smoke-test", api.pull(image, stream=True, decode=True, auth_config=config), log, host, bool(config)
        )
    except BuildFailed as exc:
        raise SmokeTestFailed(f"could not pull the image: {exc.message}") from None
    try:
        yield
    finally:
        with suppress(docker.errors.DockerException):
            api.remove_image(image, force=True)


def _wait_until_serving(
    api: docker.APIClient, cid: str, deadline: float, timeout: float, memory_mb: int, pids: int, disk_mb: int
) -> None:
    waited = 0.0
    while True:
        answer = _probe(api, cid, memory_mb)
        if answer is True:
            return
        state = _state(api, cid, settle=isinstance(answer, str))
        if not state.get("Running"):
            raise _exited(api, cid, state, memory_mb, pids)
        if _over_disk_limit(api, cid, disk_mb):
            raise SmokeTestFailed(
                f"the container wrote more than its disk limit of {disk_mb} MB "
                "(MMS_SMOKE_TEST_DISK_MB) before answering GET /",
                _tail(api, cid),
            )
        if _at_process_limit(api, cid):
            raise SmokeTestFailed(
                f"the container reached its process limit ({pids} processes and threads) before answering GET /",
                _tail(api, cid),
            )
        if isinstance(answer, str):
            raise SmokeTestFailed(f"could not ask GET / inside the container: {answer}", _tail(api, cid))
        if time.monotonic() > deadline:
            logs = _tail(api, cid)
            raise SmokeTestFailed(
                f"GET / did not answer 200 within {timeout:g} s{_process_limit_hint(logs, pids)}", logs
            )
        # Each probe starts a python3 in the container: ask less often as the wait grows.
        pause = min(1.0, 0.25 + waited / 20)
        waited += pause
        time.sleep(pause)


def _state(api: docker.APIClient, cid: str, settle: bool) -> Mapping:
    """The container's state; with ``settle``, once it stopped or two seconds passed.

    A probe that failed may have been killed with its container (init() killed by the memory
    limit, say) before the engine reports the container stopped: the exit explains more.
    """
    deadline = time.monotonic() + (2 if settle else 0)
    while True:
        state = api.inspect_container(cid)["State"]
        if not state.get("Running") or time.monotonic() >= deadline:
            return state
        time.sleep(0.2)


def _probe(api: docker.APIClient, cid: str, memory_mb: int) -> bool | str:
    """True if GET / answered 200, False if not (yet), or why the probe itself could not run."""
    command = ["python3", "-I", "-S", "-c", _PROBE.format(port=PORT)]
    try:
        exec_id = api.exec_create(cid, command, stdout=True, stderr=True)["Id"]
        output = _read_capped(api.exec_start(exec_id, stream=True))
        info = api.exec_inspect(exec_id)
    except docker.errors.APIError as exc:  # the container stopped meanwhile, most likely
        return f"the engine refused to run python3 in it: {exc.explanation or exc}"
    if info.get("Running"):  # it printed too much, or the engine stopped waiting for it
        return "the probe (python3 on the image's PATH) did not finish, or printed too much"
    code = info.get("ExitCode")
    answer = _PROBE_ANSWER.findall(output)
    if code == 0 and answer:
        return answer[-1] == b"200"
    lines = output.decode("utf-8", errors="replace").strip().splitlines()
    why = f": {lines[-1].strip()[:300]}" if lines else ""
    if code == 137:  # SIGKILL: in a container, the memory limit's OOM killer most likely
        why += f" (killed: the container may have run out of memory, limit {memory_mb} MB)"
    return f"the probe (python3 on the image's PATH) failed with code {code}{why}"


def _read_capped(stream: CancellableStream) -> bytes:
    """What a probe printed, at most ``_PROBE_OUTPUT_BYTES``: the image's python3 is the
    tenant's, and the worker must not hold whatever it prints."""
    output = b""
    try:
        for chunk in stream:
            output += chunk
            if len(output) > _PROBE_OUTPUT_BYTES:
                break
    finally:
        with suppress(OSError, docker.errors.DockerException):
            stream.close()  # shuts the socket: the engine stops sending
        stream._response.close()  # and lets it go, which close() alone leaves to the GC
    return output[:_PROBE_OUTPUT_BYTES]


def _exited(api: docker.APIClient, cid: str, state: Mapping, memory_mb: int, pids: int) -> SmokeTestFailed:
    logs = _tail(api, cid)
    code = state.get("ExitCode")
    if state.get("OOMKilled"):
        return SmokeTestFailed(
            f"the container ran out of memory (limit {memory_mb} MB) and was killed (exit "
            f"code {code}) before answering GET /",
            logs,
        )
    return SmokeTestFailed(
        f"the container exited with code {code} before answering GET /{last_error_line(logs)}"
        f"{_process_limit_hint(logs, pids)}",
        logs,
    )


def _at_process_limit(api: docker.APIClient, cid: str) -> bool:
    """Whether the engine counts as many processes and threads as the limit allows
    (less the probe's own)."""
    with suppress(docker.errors.APIError, requests.exceptions.RequestException):
        # one_shot (API 1.41): the counts now, without waiting for a second CPU sample.
        one_shot = True if docker.utils.version_gte(api.api_version, "1.41") else None
        stats = api.stats(cid, stream=False, one_shot=one_shot).get("pids_stats") or {}
        limit = stats.get("limit") or 0
        return limit > 0 and stats.get("current", 0) >= limit - _PROBE_PIDS
    return False


def _over_disk_limit(api: docker.APIClient, cid: str, disk_mb: int) -> bool:
    """Whether the container's own writes (its ``SizeRw``) passed ``disk_mb``."""
    with suppress(docker.errors.APIError, requests.exceptions.RequestException):
        found = api.containers(all=True, size=True, filters={"id": cid})
        return bool(found) and int(found[0].get("SizeRw") or 0) > disk_mb * _MB
    return False


def _process_limit_hint(logs: str, pids: int) -> str:
    """A note naming the process limit when the output shows a fork or thread refused."""
    if any(hint in logs for hint in _PROCESS_LIMIT_HINTS):
        return (
            f" (a process or thread could not start: the container may have reached its "
            f"process limit of {pids} processes and threads)"
        )
    return ""


def _tail(api: docker.APIClient, cid: str) -> str:
    raw = api.logs(cid, stdout=True, stderr=True, tail=_TAIL_LINES)
    return raw.decode("utf-8", errors="replace").rstrip()


def last_error_line(logs: str) -> str:
    """': <the traceback's exception line>', the reason a user recognises, if there is one."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return f": {line[:300]}"
    return f": {lines[-1][:300]}" if lines else ""
