"""Start a freshly built image once and check that it serves before the build is called good.

A score.py whose ``init()`` raises makes the scoring server exit before it opens its port,
so the build fails here, with the traceback, instead of at deploy time.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress

import docker
import requests

from workers.builders import BuildFailed, Log
from workers.builders.docker import check_stream, engine_client, registry_host

__all__ = ["SmokeTestFailed", "smoke_test"]

logger = logging.getLogger(__name__)

_TAIL_LINES = 80
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")


class SmokeTestFailed(Exception):
    """The image did not serve ``GET /``; ``logs`` holds the container's last output."""

    def __init__(self, message: str, logs: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.logs = logs


def smoke_test(docker_host: str | None, image: str, log: Log, timeout: float = 60, *,
               pull: bool = False, pull_auth: Mapping[str, str] | None = None) -> None:
    """Run ``image`` until ``GET /`` answers 200; raise if it never does.

    The image is in the engine already (the docker builder), or ``pull`` fetches it first
    (the oci builder pushed it without an engine) and removes it afterwards.
    """
    port = _free_port()
    started = time.monotonic()
    try:
        api = engine_client(docker_host, timeout=30)
        with api, _pulled(api, image, pull, pull_auth, log):
            container = api.create_container(
                image,
                # Host networking is all the engine has; keep the server on loopback.
                environment={"PORT": str(port), "HOST": "127.0.0.1"},
                host_config=api.create_host_config(network_mode="host"),
                labels={"org.mms.smoke-test": "true"},
            )
            cid = container["Id"]
            try:
                api.start(cid)
                log(f"mms: smoke test: started {image} ({cid[:12]}), waiting for GET / "
                    f"on port {port}")
                _wait_until_serving(api, cid, port, started + timeout, timeout)
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
def _pulled(api: docker.APIClient, image: str, pull: bool, auth: Mapping[str, str] | None,
            log: Log) -> Iterator[None]:
    if not pull:
        yield
        return
    host = registry_host(image)
    config = {**auth, "serveraddress": host} if auth else {}
    log(f"mms: smoke test: pulling {image}")
    try:
        check_stream("smoke-test", api.pull(image, stream=True, decode=True, auth_config=config),
                     log, host, bool(config))
    except BuildFailed as exc:
        raise SmokeTestFailed(f"could not pull the image: {exc.message}") from None
    try:
        yield
    finally:
        with suppress(docker.errors.DockerException):
            api.remove_image(image, force=True)


def _wait_until_serving(api: docker.APIClient, cid: str, port: int, deadline: float,
                        timeout: float) -> None:
    while True:
        if _answers_200(port):
            return
        state = api.inspect_container(cid)["State"]
        if not state.get("Running"):
            logs = _tail(api, cid)
            raise SmokeTestFailed(
                f"the container exited with code {state.get('ExitCode')} before answering "
                f"GET /{_last_error(logs)}", logs)
        if time.monotonic() > deadline:
            logs = _tail(api, cid)
            raise SmokeTestFailed(f"GET / did not answer 200 within {timeout:g} s", logs)
        time.sleep(0.25)


def _answers_200(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _tail(api: docker.APIClient, cid: str) -> str:
    raw = api.logs(cid, stdout=True, stderr=True, tail=_TAIL_LINES)
    return raw.decode("utf-8", errors="replace").rstrip()


def _last_error(logs: str) -> str:
    """': <the traceback's exception line>', the reason a user recognises, if there is one."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line):
            return f": {line[:300]}"
    return f": {lines[-1][:300]}" if lines else ""


def _free_port() -> int:
    # The container shares the host's network, so it needs a port nobody holds.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
