"""The ``local`` target: a service's replicas as containers on the workers' own engine.

Each service has its own internal bridge (workers.deploy.local_network) under the host
firewall of ``mmss+`` bridges; each replica is a contained container
(workers.containment.replica_host_config) that publishes no port: the scoring gateway, on
the engine's host, connects to its address on that bridge. What runs is read from the engine
by labels every pass, never remembered: ``org.mms.service`` (the service's id),
``org.mms.generation`` and ``org.mms.image`` (the image's id, so an update can be rolled
back to what the old generation runs).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import UTC, datetime
from typing import Self

import docker
import requests

from app.deployments.reconciler import Failure, LogLine, Replica, Spec
from workers.builders import BuildFailed
from workers.builders.docker import check_stream, engine_client, registry_host
from workers.containment import REPLICA_PORT, replica_host_config
from workers.deploy.local_network import (
    ensure_service_network,
    network_name,
    remove_service_network,
    service_networks,
)
from workers.smoke_test import last_error_line

log = logging.getLogger("mms.deploy.local")

SERVICE_LABEL = "org.mms.service"
GENERATION_LABEL = "org.mms.generation"
IMAGE_LABEL = "org.mms.image"
ACCOUNT_LABEL = "org.mms.account"
# Which installation (database) made an object: engines may be shared (tests, staging beside
# production), and the orphan sweep removes only its own installation's leftovers.
INSTALLATION_LABEL = "org.mms.installation"
# On the swarm target's objects (workers.deploy.swarm), which this driver's sweep leaves alone:
# the config-only networks carry ours, the tasks' containers the engine's.
SWARM_TARGET_LABEL = "org.mms.target=swarm"
SWARM_TASK_LABEL = "com.docker.swarm.task.id"
# The engine restarts a replica that exits this many times (restart policy on-failure)
# before the reconciler sees it stopped for good.
MAX_RESTARTS = 3
_LOG_TAIL = 80
# What a pass copies of a replica's output, at most, and of each line.
LOG_LINES_PER_PASS = 200
LOG_LINE_CHARS = 4096
_PROBE_TIMEOUT = 1.0  # the whole probe: connect, request, status line
_PROBE_HEAD_BYTES = 1024  # a status line is short: more without one is not HTTP
_STOP_SECONDS = 2
_MAX_PROBES = 32  # at once, in one pass (a service has at most a /27's worth of replicas)


class EngineUnreachable(Exception):
    """The engine did not answer: the service's state says so, nothing is decided."""


class TargetRefused(Exception):
    """The target will not run the service as it stands (its credentials, its settings, a
    missing client): the service fails saying why; tried again once the tenant changes it."""


class LocalDriver:
    def __init__(self, docker_host: str | None, *, installation: str, subnet_pool: str, tmp_mb: int, pids: int) -> None:
        self._docker_host = docker_host
        self._installation = installation
        self._pool = subnet_pool
        self._tmp_mb = tmp_mb
        self._pids = pids
        try:
            self._api = engine_client(docker_host, timeout=30)
            self._api.ping()
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            raise EngineUnreachable(f"the Docker engine of the local target did not answer ({type(exc).__name__})")

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def observe(self, spec: Spec) -> tuple[list[Replica], Failure | None]:
        """Every replica of the service the engine holds, probed; and, when the desired
        generation has a replica that exited for good before it ever served, why."""
        replicas: list[Replica] = []
        failure: Failure | None = None
        found = [(container, self._api.inspect_container(container["Id"])) for container in self._containers(spec.id)]
        # All probed at once: a tenant whose replicas all stall GET / costs a pass one probe
        # timeout, not one per replica (the deploy worker's few threads pass every tenant's).
        addresses = [_probed_address(info, spec) for _, info in found]
        with ThreadPoolExecutor(max_workers=max(1, min(len(found), _MAX_PROBES))) as pool:
            answered = list(pool.map(lambda address: address is not None and answers(address), addresses))
        for (container, info), ready in zip(found, answered, strict=True):
            replica = self._replica(container, info, spec, ready)
            replicas.append(replica)
            gave_up = not replica.alive and (replica.restarts >= MAX_RESTARTS or replica.oom_killed)
            if failure is None and replica.generation == spec.generation and gave_up:
                failure = self._why_it_stopped(replica, info)
        return replicas, failure

    def read_logs(self, spec: Spec, replicas: Sequence[Replica]) -> list[LogLine]:
        """What each replica printed since the newest line already copied (at most
        ``LOG_LINES_PER_PASS`` a replica: a replica that floods keeps only its latest)."""
        return [line for r in replicas for line in new_log_lines(self._api, r.id, r, spec.log_marks.get(r.id, 0))]

    def start(self, spec: Spec, count: int, pull_auth: Mapping[str, str] | None) -> list[str]:
        """Start ``count`` replicas of the desired generation; their ids."""
        if count <= 0:
            return []
        network = ensure_service_network(
            self._api, spec.id, self._pool, labels={INSTALLATION_LABEL: self._installation}
        )
        image = self._pulled(spec, pull_auth)
        memory_mb = max(64, int(spec.memory_gb * 1024))
        host_config = replica_host_config(
            self._api,
            image=image,
            network=network.name,
            cpus=spec.cpu,
            memory_mb=memory_mb,
            pids=self._pids,
            tmp_mb=self._tmp_mb,
        )
        started = []
        for _ in range(count):
            name = f"mms-{spec.id.hex[:12]}-g{spec.generation}-{secrets.token_hex(3)}"
            container = self._api.create_container(
                image,
                name=name,
                hostname="localhost",
                environment={"PORT": str(REPLICA_PORT)},
                host_config=host_config,
                labels={
                    SERVICE_LABEL: str(spec.id),
                    GENERATION_LABEL: str(spec.generation),
                    IMAGE_LABEL: str(spec.image_id),
                    ACCOUNT_LABEL: str(spec.account_id),
                    INSTALLATION_LABEL: self._installation,
                },
            )
            self._api.start(container["Id"])
            started.append(container["Id"])
        log.info("deploy.started", extra={"service": str(spec.id), "generation": spec.generation, "count": count})
        return started

    def remove(self, replica_ids: Sequence[str]) -> None:
        for replica_id in replica_ids:
            # SIGTERM first: uvicorn finishes what it is answering (the gateway stopped sending).
            with suppress(docker.errors.NotFound):
                with suppress(docker.errors.APIError, requests.RequestException):
                    self._api.stop(replica_id, timeout=_STOP_SECONDS)
                self._api.remove_container(replica_id, force=True, v=True)

    def remove_all(self, service_id: uuid.UUID) -> bool:
        """Everything the engine holds of the service: replicas, then its network; whether all is gone."""
        self.remove([c["Id"] for c in self._containers(service_id)])
        remove_service_network(self._api, service_id)
        return True

    def sweep(self, known: Callable[[], set[uuid.UUID]]) -> list[uuid.UUID]:
        """Remove what the engine holds of this installation's services that no longer exist
        (their account was deleted, or a worker died between the row's delete and the
        cleanup); their ids. An orphan's replicas go first and its network one sweep later
        (a minute: the beat's period), once no gateway can still route to their addresses
        (2 x MMS_GATEWAY_CACHE_SECONDS + 1 s at most): the network's /27 freed at once could be
        the next service's, its first replica at a deleted one's address."""
        ours = f"{INSTALLATION_LABEL}={self._installation}"
        # Not the swarm target's objects on the same engine (workers.deploy.swarm sweeps those).
        held: set[uuid.UUID] = set(service_networks(self._api, label=ours)) - set(
            service_networks(self._api, label=SWARM_TARGET_LABEL)
        )
        for container in self._api.containers(all=True, filters={"label": [SERVICE_LABEL, ours]}):
            if SWARM_TASK_LABEL in (container.get("Labels") or {}):
                continue
            with suppress(ValueError, TypeError):
                held.add(uuid.UUID(container["Labels"][SERVICE_LABEL]))
        orphans = sorted(held - known())  # read after the listing: see reconcile.sweep_orphans
        for service_id in orphans:
            if replicas := self._containers(service_id):
                self.remove([c["Id"] for c in replicas])
            else:
                remove_service_network(self._api, service_id)
        return orphans

    def _containers(self, service_id: uuid.UUID) -> list[dict]:
        """The service's replicas: this installation's containers on the service's own network.
        A label alone proves nothing: an image's labels are on every container that runs it
        (a build's RUN steps on the build network, the smoke test), so a tenant whose image
        names another's service id would be probed, routed to, counted and failed over."""
        ours = [f"{SERVICE_LABEL}={service_id}", f"{INSTALLATION_LABEL}={self._installation}"]
        return self._api.containers(all=True, filters={"label": ours, "network": network_name(service_id)})

    def _replica(self, container: Mapping, info: Mapping, spec: Spec, ready: bool) -> Replica:
        state = info["State"]
        labels = info["Config"].get("Labels") or {}
        address = _address(info, spec)
        alive = bool(state.get("Running") or state.get("Restarting"))
        try:
            generation = int(labels.get(GENERATION_LABEL, "0"))
        except ValueError:
            generation = 0
        return Replica(
            id=info["Id"],
            generation=generation,
            image_id=labels.get(IMAGE_LABEL),
            address=address,
            alive=alive,
            ready=ready,
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            restarts=int(info.get("RestartCount") or 0),
            created=float(container.get("Created") or 0),
        )

    def _why_it_stopped(self, replica: Replica, info: Mapping) -> Failure:
        logs = self._api.logs(replica.id, stdout=True, stderr=True, tail=_LOG_TAIL).decode("utf-8", "replace")
        if replica.oom_killed:
            limit = (info.get("HostConfig") or {}).get("Memory") or 0
            reason = f"a replica ran out of memory (limit {limit // 2**20} MB) before it answered GET /"
        else:
            reason = (
                f"a replica exited with code {replica.exit_code} {replica.restarts + 1} times before it "
                f"answered GET /{last_error_line(logs)}"
            )
        return Failure(reason, logs.rstrip())

    def _pulled(self, spec: Spec, auth: Mapping[str, str] | None) -> str:
        return pulled_image(self._api, spec, auth)


def pulled_image(api: docker.APIClient, spec: Spec, auth: Mapping[str, str] | None) -> str:
    """The image by digest (what was built, whatever a tag now says), pulled if absent."""
    reference = pinned_reference(spec.image_location, spec.image_digest)
    with suppress(docker.errors.ImageNotFound):
        api.inspect_image(reference)
        return reference
    host = registry_host(reference)
    config = {**auth, "serveraddress": host} if auth else {}
    try:
        pulling = api.pull(reference, stream=True, decode=True, auth_config=config)
        check_stream("deploy", pulling, _quiet, host, bool(config))
    except BuildFailed as exc:
        raise EngineUnreachable(f"could not pull the image {reference}: {exc.message}") from None
    return reference


def new_log_lines(api: docker.APIClient, container_id: str, replica: Replica, mark: int) -> list[LogLine]:
    """What the replica's container printed after ``mark`` (ns), at most ``LOG_LINES_PER_PASS``."""
    try:
        raw = api.logs(
            container_id,
            stdout=True,
            stderr=True,
            timestamps=True,
            tail=LOG_LINES_PER_PASS,
            since=mark / 1e9 if mark else None,
        )
    except docker.errors.NotFound:
        return []
    return last_log_lines(raw, replica, after_ns=mark)


def last_log_lines(raw: bytes, replica: Replica, *, after_ns: int) -> list[LogLine]:
    """The last ``LOG_LINES_PER_PASS`` of the engine's lines, whatever it sent (a tenant's may
    ignore ``tail``: rsplit makes no more pieces than that, however many lines came)."""
    tail = b"\n".join(raw.rstrip(b"\n").rsplit(b"\n", LOG_LINES_PER_PASS)[-LOG_LINES_PER_PASS:])
    return parse_log_lines(tail, replica, after_ns=after_ns)


def parse_log_lines(raw: bytes, replica: Replica, *, after_ns: int) -> list[LogLine]:
    """The engine's ``<RFC 3339 time> <text>`` lines newer than ``after_ns``, each cut at
    ``LOG_LINE_CHARS``."""
    lines = []
    for entry in raw.decode("utf-8", "replace").splitlines():
        stamp, _, text = entry.partition(" ")
        logged_ns = _nanoseconds(stamp)
        if logged_ns is None or logged_ns <= after_ns:
            continue
        lines.append(LogLine(replica.id, replica.generation, logged_ns, text[:LOG_LINE_CHARS]))
    return lines


def _nanoseconds(stamp: str) -> int | None:
    """``2026-12-03T02:10:00.12345Z`` (the engine trims trailing zeros) as ns since the epoch."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        seconds = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        return int(seconds) * 1_000_000_000 + int((fraction or "0")[:9].ljust(9, "0"))
    except ValueError:
        return None


def pinned_reference(location: str, digest: str | None) -> str:
    """``host/repo@sha256:…`` from an image's location and digest (the location as is without one)."""
    if not digest:
        return location
    name = location.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a tag, not a registry's port
        name = name[:colon]
    return f"{name}@{digest}"


def repository_of(reference: str) -> str:
    """The repository part of a reference: no registry host, tag or digest."""
    name = reference.split("@", 1)[0]
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        name = rest
    slash, colon = name.rfind("/"), name.rfind(":")
    return name[:colon] if colon > slash else name


def _address(info: Mapping, spec: Spec) -> str | None:
    """``host:port`` of the replica on the service's network (never another network's)."""
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    address = (networks.get(network_name(spec.id)) or {}).get("IPAddress")
    return f"{address}:{REPLICA_PORT}" if address else None


def _probed_address(info: Mapping, spec: Spec) -> str | None:
    """The address to probe: a running replica's."""
    return _address(info, spec) if (info.get("State") or {}).get("Running") else None


def answers(address: str) -> bool:
    """Whether the replica answers ``GET /`` with 200, asked from the engine's host within
    _PROBE_TIMEOUT in all. The replica is the tenant's code: only its status line is read (a
    body, however long, is not), no redirect is followed (the worker would fetch whatever
    address the replica names: the host's loopback, another service's replica), and a reply
    dripped a byte at a time cannot hold the pass past its lease."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + _PROBE_TIMEOUT
    head = b""
    try:
        with socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
            while b"\n" not in head and len(head) < _PROBE_HEAD_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sock.settimeout(left)
                chunk = sock.recv(_PROBE_HEAD_BYTES - len(head))
                if not chunk:
                    break
                head += chunk
    except (OSError, ValueError):
        return False
    line, newline, _ = head.partition(b"\n")
    status = line.split()
    return bool(newline) and len(status) >= 2 and status[0] in (b"HTTP/1.0", b"HTTP/1.1") and status[1] == b"200"


def _quiet(_: str) -> None:
    pass
