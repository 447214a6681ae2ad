"""The ``swarm`` target: a service's replicas as the tasks of swarm services on the operator's
swarm (MMS_SWARM_DOCKER_HOST). v1 runs on one node, the workers' own engine in swarm mode.

docs/design/web-services.md, "Swarm (measured)": the routing mesh, host-mode ports and VIPs do
not work on an engine without iptables, and a swarm-scoped bridge ignores its own subnet and
bridge name. So each service gets a config-only network (a /27 of MMS_SERVICE_SUBNET_POOL,
bridge ``mmss<10 hex>``, labelled: the same host firewall as ``local`` holds it) and a
swarm-scoped bridge made from it (which takes no labels: found by name); each generation is
one swarm service ``mms-<id hex12>-g<n>`` with no published port, whose tasks the gateway
reaches at their container's address; all placed on the node the worker talks to (a node
joined later lacks the config-only network: design §1, "Multi-node swarm"). Swarm replaces
a task that exits; scaling is the service's replica count. What runs is read from the engine
every pass, by labels, as for ``local``.

A swarm a tenant attached (``published_host`` set: workers/deploy/tenant_swarm.py opens it)
is another's hosts, not ours: no service network or host firewall of ours there; each task
publishes the replica port in host mode on a port its engine picks, on any node whose address
the gateway may route to (``node_ports`` judges each node, by the address the engine claims
for it and a proof that the node is the tenant's: workers/deploy/tenant_swarm.py; the others
are kept off by placement constraints), and the gateway reaches it at its node's checked address
(the manager's: the one the worker checked and connected to) and the task's port, never a task
IP. Those ports are reachable around the gateway, so such services run without key auth
(design §1, "A tenant's swarm", "Multi-node swarm").
The routing mesh is not used: it needs IPVS, which the tests' kernel lacks (measured).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from datetime import datetime
from typing import ParamSpec, Protocol, Self, TypeVar

import docker
import requests

from app.deployments.reconciler import Failure, LogLine, Replica, Spec
from workers.builders.docker import EngineAnswerRefused, engine_client, registry_host, set_deadline
from workers.containment import REPLICA_PORT, replica_task_template
from workers.deploy.local import (
    ACCOUNT_LABEL,
    GENERATION_LABEL,
    IMAGE_LABEL,
    INSTALLATION_LABEL,
    LOG_LINES_PER_PASS,
    SERVICE_LABEL,
    SWARM_TARGET_LABEL,
    SWARM_TASK_LABEL,
    EngineUnreachable,
    answers,
    last_log_lines,
    new_log_lines,
    pulled_image,
)
from workers.deploy.local_network import (
    ServiceNetworkError,
    bridge_name,
    free_slots,
    network_name,
    service_networks,
)
from workers.smoke_test import last_error_line

log = logging.getLogger("mms.deploy.swarm")

# A generation whose tasks failed this many times before one answered GET / never will.
MAX_FAILED_TASKS = 3
_LOG_TAIL = 80
_MAX_LOG_TASKS = 32  # tasks whose new lines one pass copies (as kubernetes_driver's pods)
_ALIVE = frozenset({"new", "pending", "assigned", "accepted", "ready", "preparing", "starting", "running"})
_FAILED = frozenset({"failed", "rejected"})
_BRIDGE_OPTION = "com.docker.network.bridge.name"
# How long a delete waits for the tasks' containers to go before it removes the networks
# (the engine refuses while they are attached); past it, the next pass goes on.
_REMOVE_WAIT_SECONDS = 20.0
# A tenant's engine may list any number of services and tasks, and be slow on every call: one
# driver's work (a pass, a cleanup's try) is bounded by the spec, not by what the engine lists,
# and ends within PASS_SECONDS (as kubernetes_driver's _PASS_SECONDS): its calls, probes and
# waits together; past it, a call in flight is cut off and the pass fails naming the limit.
PASS_SECONDS = 120.0
# ... but a pass that starts a generation pulls its image first: its deadline moves to this
# far ahead (a pull's answer takes at most MAX_TENANT_ANSWER_SECONDS: workers.builders.docker).
PULL_SECONDS = 660.0
# Of the service's swarm services, a pass looks at the desired and the traffic generation's and
# at most this many others (the newest: they only go); the rest wait for later passes.
MAX_OTHER_GENERATIONS = 2
# remove_all removes at most this many swarm services a call (a swarm holds one a generation).
MAX_REMOVED_SERVICES = 8
# remove scales down for at most this many tasks a call (the next pass removes the rest).
MAX_REMOVED_TASKS = 64
# On a tenant's swarm, at most this many nodes whose address the gateway may not route to are
# kept off by a constraint each (a node's ID a few characters of the engine's choosing); a
# swarm with more (or an ID that is no swarm ID) has its tasks pinned to the manager instead.
MAX_EXCLUDED_NODES = 16
# A swarm keeps the registry auth a swarm service was made (or last updated) with, and a node
# that gets a task later (a replica replaced elsewhere, a scale-up) pulls the image with it: a
# pull token expires (ENGINE_PULL_TOKEN_SECONDS, 900 s), so a pass gives the serving
# generations a fresh one when theirs is older than this. Swarm restarts no running task for it
# (a task's pull options are not what makes it out of date), and the label is the service's.
PULL_AUTH_RENEW_SECONDS = 300.0
PULL_AUTH_LABEL = "org.mms.pull-auth-at"
# A tenant's swarm listing more nodes than this has its tasks pinned to the manager: each node
# judged may cost a proof (workers/deploy/tenant_swarm.py), and a pass's work is bounded.
MAX_JUDGED_NODES = 64
NODE_ID = re.compile(r"[a-z0-9]{1,64}")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _bounded(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """``method``, with a tenant engine's answer refused (past its bound or its time, a
    redirect: workers.builders.docker) or not coming as the reconciler's EngineUnreachable,
    which says why and nothing of the answer."""

    @functools.wraps(method)
    def bounded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except EngineAnswerRefused as exc:
            raise EngineUnreachable(f"the swarm's engine {exc}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:  # the engine away, or too slow
            raise EngineUnreachable(f"the swarm's engine did not answer ({type(exc).__name__})") from None

    return bounded


def _in_time(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """``method``, whatever it raised past the driver's deadline (a call cut off, refused, or
    a check between calls) as EngineUnreachable naming the deadline."""

    @functools.wraps(method)
    def timed(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except Exception:
            driver = args[0]
            assert isinstance(driver, SwarmDriver)
            if driver.late():
                raise EngineUnreachable(driver._late()) from None
            raise

    return timed


def config_network_name(service_id: uuid.UUID) -> str:
    return f"mms-svccfg-{service_id.hex}"


def swarm_service_name(service_id: uuid.UUID, generation: int) -> str:
    return f"mms-{service_id.hex[:12]}-g{generation}"


class NodeJudgement(Protocol):
    """How a tenant's swarm judges its other nodes (workers/deploy/tenant_swarm.py NodeJudge)."""

    def __call__(self, node_id: str, address: str, deadline: float) -> frozenset[int] | None:
        """The ports the gateway may reach on the node (None: any; frozenset(): none), judged
        by ``deadline`` (time.monotonic(): the pass's)."""

    def pending(self, node_id: str) -> bool:
        """Whether the node was given no port only for want of a proof (so far)."""


class SwarmDriver:
    def __init__(
        self,
        docker_host: str,
        *,
        installation: str,
        subnet_pool: str,
        tmp_mb: int,
        pids: int,
        tls: docker.tls.TLSConfig | None = None,
        published_host: str | None = None,
        published_ports: frozenset[int] | None = None,
        node_ports: NodeJudgement | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """``published_host``: a tenant's swarm, whose tasks the gateway reaches at this address
        (the manager's, as the worker checked it) and the port each task publishes, if it is one
        of ``published_ports`` (None: any; workers/deploy/tenant_swarm.py says which);
        ``node_ports``: the same judgement of another node, by its ID and address (the engine's
        ``Status.Addr``; frozenset(): refused, or not proven yet), None to keep every task on the
        manager;
        ``server_hostname``: the name its certificate is checked against, when ``docker_host``
        holds the address the name was resolved to (workers.builders.docker.engine_client)."""
        self._installation = installation
        self._task_container: dict[str, str] = {}  # task id -> its container, as observed
        self._task_node: dict[str, str] = {}  # task id -> its node, as observed
        self._pool = subnet_pool
        self._tmp_mb = tmp_mb
        self._pids = pids
        self._published_host = published_host
        self._published_ports = published_ports
        self._node_ports = node_ports
        self._nodes: dict[str, tuple[str, frozenset[int] | None]] | None = None  # read once a driver
        self._too_many_nodes = False
        self._observed: dict[int, dict] = {}  # the wanted generations' swarm services, as observed
        self._task_service: dict[str, str] = {}  # task id -> its swarm service, as observed
        self._pass_seconds = PASS_SECONDS
        self._ends = time.monotonic() + self._pass_seconds
        try:
            self._api = engine_client(
                docker_host, timeout=30, tls=tls, server_hostname=server_hostname, deadline=self._ends
            )
            info = self._api.info()
            swarm = info.get("Swarm") if isinstance(info, Mapping) else None
            if not isinstance(swarm, Mapping):  # a tenant's engine may answer anything
                swarm = {}
        except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
            if api := getattr(self, "_api", None):
                api.close()
            if time.monotonic() >= self._ends:
                raise EngineUnreachable(self._late()) from None
            if isinstance(bound := exc.__cause__ or exc, EngineAnswerRefused):  # docker-py wraps /version's
                raise EngineUnreachable(f"the swarm's engine {bound}") from None
            raise EngineUnreachable(f"the swarm's engine did not answer ({type(exc).__name__})") from None
        except BaseException:
            if api := getattr(self, "_api", None):
                api.close()  # its deadline's timer and its connection with it
            raise
        self._node_id = str(swarm.get("NodeID") or "")
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            self._api.close()
            raise EngineUnreachable(
                f"the swarm's engine is not a swarm manager (swarm {swarm.get('LocalNodeState') or 'inactive'}): "
                "run docker swarm init there, or point MMS_SWARM_DOCKER_HOST at a manager"
            )

    def close(self) -> None:
        self._api.close()

    def late(self) -> bool:
        """Is the driver past its deadline (PASS_SECONDS from its making)?"""
        return time.monotonic() >= self._ends

    def _late(self) -> str:
        return f"the swarm's engine did not finish within {self._pass_seconds:g} s (all of a pass's calls)"

    def _check_time(self) -> None:
        """Between two calls, probes or waits: past the deadline, the pass stops here."""
        if self.late():
            raise EngineUnreachable(self._late())

    def _extend(self, seconds: float) -> None:
        """The deadline at least ``seconds`` from now (an image pull)."""
        self._ends = max(self._ends, time.monotonic() + seconds)
        self._pass_seconds = max(self._pass_seconds, seconds)
        set_deadline(self._api, self._ends)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @_in_time
    @_bounded
    def observe(self, spec: Spec) -> tuple[list[Replica], Failure | None]:
        """The tasks swarm keeps running for every generation of the service, probed; and,
        when the desired generation's tasks failed again and again before any served, why."""
        replicas: list[Replica] = []
        failure: Failure | None = None
        wanted = {spec.generation, spec.traffic_generation}
        # Of each generation's tasks, those a pass acts on: the spec's count, and as many again as
        # may fail before the generation does (more than swarm runs: scaled down over passes).
        keep = max(0, spec.replicas) + MAX_FAILED_TASKS
        for generation, service in self._generations(spec.id, wanted):
            self._check_time()
            if generation in wanted:
                self._observed[generation] = service
            labels = service["Spec"].get("Labels") or {}
            tasks = [t for t in self._api.tasks(filters={"service": service["ID"]}) if isinstance(t, Mapping)]
            alive = sorted((t for t in tasks if t.get("DesiredState") in _ALIVE), key=_running_first)[:keep]
            seen = []
            for task in alive:
                self._check_time()
                self._task_service[task["ID"]] = service["ID"]
                # Only the generations that serve or are about to are probed; the others only go.
                seen.append(self._replica(task, generation, labels.get(IMAGE_LABEL), probe=generation in wanted))
            replicas += seen
            failed = [t for t in tasks if (t.get("Status") or {}).get("State") in _FAILED]
            if generation != spec.generation:
                continue
            ready_on = {
                str(task.get("NodeID") or "") for task, replica in zip(alive, seen, strict=True) if replica.ready
            }
            if node := _failing_node(failed, ready_on):
                failure = self._why_it_failed(
                    service, [t for t in failed if str(t.get("NodeID") or "") == node], node=node
                )
            elif len(failed) >= MAX_FAILED_TASKS and not ready_on:
                failure = self._why_it_failed(service, failed)
            elif not any(r.address for r in seen):
                failure = self._unroutable(alive) or failure
        return replicas, failure

    def _unroutable(self, tasks: Sequence[Mapping]) -> Failure | None:
        """On a tenant's swarm: a running task on a node the gateway may not route to (one whose
        address was refused after the generation was placed), or that published a port its
        node's address is not allowed at (the engine picks it), can never be routed to; without
        this the generation would wait out its start timeout saying nothing of why."""
        if not self._published_host or self._published_ports == frozenset():
            return None  # a pass that routes nowhere (a delete)
        for task in tasks:
            status = task.get("Status") or {}
            port = published_port(status) if status.get("State") == "running" else None
            if port is None:
                continue
            node = str(task.get("NodeID") or "")
            if not node or node == self._node_id:
                where, ports = "the manager", self._published_ports
            elif self._node_ports is None:
                continue
            else:
                where, ports = f"node {node[:64]}", self._judged_nodes().get(node, ("", frozenset()))[1]
                if ports == frozenset() and self._node_ports.pending(node):
                    continue  # not proven yet: no route, and the start timeout decides
            if ports == frozenset():
                return Failure(
                    f"the gateway may not reach its tasks: one runs on {where}, whose address the gateway may "
                    "not route to (a public address, or one the operator lists as an address in "
                    "MMS_FETCH_ALLOW_HOSTS, or MMS_COMPUTE_ALLOW_HOSTS for this compute); the next "
                    "generation keeps off it"
                )
            if ports is not None and port not in ports:
                allowed = ", ".join(str(p) for p in sorted(ports))
                return Failure(
                    f"the gateway may not reach its tasks: they publish port {port} on {where}, and the "
                    f"operator allows {where}'s address at port {allowed} only (MMS_FETCH_ALLOW_HOSTS or "
                    "MMS_COMPUTE_ALLOW_HOSTS); "
                    "the operator lists the address without a port for the gateway to route to its tasks"
                )
        return None

    @_in_time
    @_bounded
    def read_logs(self, spec: Spec, replicas: Sequence[Replica]) -> list[LogLine]:
        """What each task printed since the newest line already copied (from its container on
        the node the worker talks to; through swarm's task logs for a tenant's task on another
        node), at most ``LOG_LINES_PER_PASS`` a task, of at most ``_MAX_LOG_TASKS`` tasks (a
        tenant's engine may list any number)."""
        lines: list[LogLine] = []
        for replica in replicas[:_MAX_LOG_TASKS]:
            self._check_time()
            container_id = self._task_container.get(replica.id)
            mark = spec.log_marks.get(replica.id, 0)
            if not container_id:
                continue
            if self._task_node.get(replica.id, self._node_id) in ("", self._node_id):
                lines += new_log_lines(self._api, container_id, replica, mark)
            else:
                lines += self._task_log_lines(replica, mark)
        return lines

    def _task_log_lines(self, replica: Replica, mark: int) -> list[LogLine]:
        """A task's lines after ``mark`` (ns) as the manager relays them from the task's node,
        at most ``LOG_LINES_PER_PASS``: read whole through the engine's bounded client (docker-py
        has no call for a task's logs)."""
        params: dict[str, object] = {"stdout": 1, "stderr": 1, "timestamps": 1, "tail": LOG_LINES_PER_PASS}
        if mark:
            params["since"] = f"{mark // 1_000_000_000}.{mark % 1_000_000_000:09d}"
        try:
            answer = self._api._get(self._api._url("/tasks/{0}/logs", replica.id), params=params)
            self._api._raise_for_status(answer)
            raw = b"".join(self._api._multiplexed_buffer_helper(answer))
        except docker.errors.NotFound:
            return []
        return last_log_lines(raw, replica, after_ns=mark)

    @_in_time
    @_bounded
    def start(self, spec: Spec, count: int, pull_auth: Mapping[str, str] | None) -> list[str]:
        """``count`` more tasks of the desired generation: its swarm service made, or scaled up.
        Returns nothing: swarm names the tasks, the next pass sees them."""
        if count <= 0:
            return []
        network = None if self._published_host else self._ensure_network(spec.id)
        service = self._service(spec.id, spec.generation)
        if service is not None:
            running = sum(t.get("DesiredState") in _ALIVE for t in self._api.tasks(filters={"service": service["ID"]}))
            # What the pass asked for on top of what it saw, never fewer than swarm already keeps
            # (a task being replaced is not seen for a moment).
            # Never more than the spec asks for, whatever number of tasks the engine lists.
            self._scale(service, max(_replicas_of(service), min(running + count, spec.replicas)), pull_auth)
            log.info("deploy.scaled", extra={"service": str(spec.id), "generation": spec.generation, "count": count})
            return []
        self._extend(PULL_SECONDS)
        image = pulled_image(self._api, spec, pull_auth)  # one node: in the engine before swarm asks
        labels = {
            SERVICE_LABEL: str(spec.id),
            GENERATION_LABEL: str(spec.generation),
            IMAGE_LABEL: str(spec.image_id),
            ACCOUNT_LABEL: str(spec.account_id),
            INSTALLATION_LABEL: self._installation,
        }
        if pull_auth:
            labels[PULL_AUTH_LABEL] = str(int(time.time()))
        template = replica_task_template(
            self._api,
            image=image,
            network=network,
            cpus=spec.cpu,
            memory_mb=max(64, int(spec.memory_gb * 1024)),
            pids=self._pids,
            tmp_mb=self._tmp_mb,
            labels=labels,
        )
        body = {
            "Name": swarm_service_name(spec.id, spec.generation),
            "Labels": labels,
            "TaskTemplate": template,
            "Mode": {"Replicated": {"Replicas": count}},
        }
        template["Placement"] = {"Constraints": self._constraints()}
        if self._published_host:
            # DNS round robin: a VIP needs IPVS, as the routing mesh does.
            body["EndpointSpec"] = {
                "Mode": "dnsrr",
                "Ports": [{"Protocol": "tcp", "TargetPort": REPLICA_PORT, "PublishMode": "host"}],
            }
        # --with-registry-auth: a node that lacks the image pulls it by digest with this.
        headers = {"X-Registry-Auth": _auth_header(pull_auth, image)} if pull_auth else {}
        try:
            self._api._result(self._api._post_json(self._api._url("/services/create"), data=body, headers=headers))
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: a concurrent pass made it: the next pass scales it
                raise
        log.info("deploy.started", extra={"service": str(spec.id), "generation": spec.generation, "count": count})
        return []

    def _constraints(self) -> list[str]:
        """Where the tasks may run. Our swarm: on the node the worker talks to (our service
        network's config-only network is that node's alone: a task elsewhere is rejected, over
        and over). A tenant's: off every node whose address the gateway may not route to, or
        on the manager when they are too many to name (design §1, "Multi-node swarm")."""
        pinned = [f"node.id=={self._node_id}"]
        if not self._published_host or self._node_ports is None:
            return pinned
        refused = [node for node, (_, ports) in self._judged_nodes().items() if ports == frozenset()]
        if self._too_many_nodes or len(refused) > MAX_EXCLUDED_NODES:
            return pinned
        if not all(NODE_ID.fullmatch(node) for node in refused):
            return pinned
        return [f"node.id!={node}" for node in refused]

    def _judged_nodes(self) -> dict[str, tuple[str, frozenset[int] | None]]:
        """The swarm's other nodes by ID: each one's address (the engine's word, read as an IP
        address) and the ports the gateway may reach there (frozenset(): none, as for a node
        with no address). Read once a driver (a pass); none judged past MAX_JUDGED_NODES."""
        if self._nodes is None:
            assert self._node_ports is not None
            self._nodes = {}
            listed = self._api.nodes()
            listed = listed if isinstance(listed, list) else []  # a tenant's engine may answer anything
            others = [node for node in listed if isinstance(node, Mapping) and node.get("ID") != self._node_id]
            if len(others) > MAX_JUDGED_NODES:
                self._too_many_nodes = True
                return self._nodes
            for node in others:
                node_id = node.get("ID")
                if not isinstance(node_id, str):
                    continue
                self._check_time()
                address = _node_address(node)
                if address is None or not NODE_ID.fullmatch(node_id):
                    self._nodes[node_id] = (address or "", frozenset())
                else:
                    self._nodes[node_id] = (address, self._node_ports(node_id, address, self._ends))
        return self._nodes

    def _published(self, task: Mapping, status: Mapping) -> str | None:
        """A tenant's running task's address: its node's checked address and the task's port."""
        node = task.get("NodeID")
        if not node or node == self._node_id:  # the manager: the address the worker checked
            return published_address(self._published_host or "", status, ports=self._published_ports)
        if self._node_ports is None:
            return None
        address, ports = self._judged_nodes().get(str(node), ("", frozenset()))
        return published_address(address, status, ports=ports) if ports != frozenset() else None

    @_in_time
    @_bounded
    def remove(self, replica_ids: Sequence[str]) -> None:
        """Scale each task's generation down by the tasks named (swarm picks which go; the
        gateway retries a request that finds one gone); a generation scaled to nothing is removed.
        At most MAX_REMOVED_TASKS of them a call (the next pass sees the rest again); a task this
        driver observed is not asked about again."""
        by_service: dict[str, int] = {}
        for task_id in replica_ids[:MAX_REMOVED_TASKS]:
            self._check_time()
            with suppress(docker.errors.NotFound):
                service_id = self._task_service.get(task_id) or self._api.inspect_task(task_id)["ServiceID"]
                by_service[service_id] = by_service.get(service_id, 0) + 1
        for service_id, count in by_service.items():
            self._check_time()
            with suppress(docker.errors.NotFound):
                service = self._api.inspect_service(service_id)
                left = _replicas_of(service) - count
                if left <= 0:
                    self._api.remove_service(service_id)
                else:
                    self._scale(service, left)

    @_in_time
    @_bounded
    def remove_all(self, service_id: uuid.UUID) -> bool:
        """Every swarm service of the service, then its networks; whether all is gone (the
        engine refuses to remove a network while a task's container is still on it). At most
        MAX_REMOVED_SERVICES swarm services a call: past them, not all is gone (the next call
        goes on), whatever number the engine lists."""
        services = self._services(service_id)
        for service in services[:MAX_REMOVED_SERVICES]:
            self._check_time()
            with suppress(docker.errors.NotFound):
                self._api.remove_service(service["ID"])
        if len(services) > MAX_REMOVED_SERVICES:
            return False
        deadline = min(time.monotonic() + _REMOVE_WAIT_SECONDS, self._ends)
        while self._task_containers(service_id) or self._services(service_id):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        if self._published_host:
            return True  # no network of ours there
        try:
            with suppress(docker.errors.NotFound):
                self._api.remove_network(network_name(service_id))
            for network in self._config_networks(service_id):
                with suppress(docker.errors.NotFound):
                    self._api.remove_network(network["Id"])
        except docker.errors.APIError as exc:
            log.info("deploy.network_busy", extra={"service": str(service_id), "reason": str(exc.explanation)})
            return False
        return True

    @_in_time
    @_bounded
    def remove_generations(self, service_id: uuid.UUID) -> bool:
        """A Failed service's swarm services, every generation's (nothing of it serves until the
        tenant changes it), those past the MAX_OTHER_GENERATIONS a pass observes too; its
        networks stay (a gateway may still route to their addresses; a change deploys on them
        again). At most MAX_REMOVED_SERVICES a call; whether none is left."""
        services = self._services(service_id)
        for service in services[:MAX_REMOVED_SERVICES]:
            self._check_time()
            with suppress(docker.errors.NotFound):
                self._api.remove_service(service["ID"])
        return len(services) <= MAX_REMOVED_SERVICES

    @_in_time
    @_bounded
    def sweep(self, known: Callable[[], set[uuid.UUID]]) -> list[uuid.UUID]:
        """Remove what the swarm holds of this installation's services that no longer exist; their
        ids. Their swarm services go first, their networks one sweep later, as on local
        (LocalDriver.sweep: no gateway may still route to the addresses a new network takes)."""
        ours = f"{INSTALLATION_LABEL}={self._installation}"
        held: set[uuid.UUID] = set(service_networks(self._api, label=ours)) & set(
            service_networks(self._api, label=SWARM_TARGET_LABEL)
        )
        for service in self._api.services(filters={"label": [SERVICE_LABEL, ours]}):
            with suppress(ValueError, TypeError, KeyError):
                held.add(uuid.UUID(service["Spec"]["Labels"][SERVICE_LABEL]))
        orphans = sorted(held - known())  # read after the listing: see reconcile.sweep_orphans
        for done, service_id in enumerate(orphans):
            if self.late():  # the rest: the next sweep
                return orphans[:done]
            if self._services(service_id) or self._task_containers(service_id):
                for service in self._services(service_id):
                    with suppress(docker.errors.NotFound):
                        self._api.remove_service(service["ID"])
            else:
                self.remove_all(service_id)
        return orphans

    def _services(self, service_id: uuid.UUID) -> list[dict]:
        """The service's swarm services made by this installation: a copy of the database given
        its own id (mms admin installation --new-id) never takes the original's for its own."""
        ours = [f"{SERVICE_LABEL}={service_id}", f"{INSTALLATION_LABEL}={self._installation}"]
        return [
            found
            for found in self._api.services(filters={"label": ours})
            if (found.get("Spec", {}).get("Labels") or {}).get(INSTALLATION_LABEL) == self._installation
        ]

    def _service(self, service_id: uuid.UUID, generation: int) -> dict | None:
        name = swarm_service_name(service_id, generation)
        return next((s for s in self._services(service_id) if s["Spec"].get("Name") == name), None)

    def _task_containers(self, service_id: uuid.UUID) -> list[dict]:
        """The service's task containers: this installation's swarm tasks (an image's own labels
        are on every container that runs it: a build's, a smoke test's)."""
        ours = [f"{SERVICE_LABEL}={service_id}", f"{INSTALLATION_LABEL}={self._installation}", SWARM_TASK_LABEL]
        return self._api.containers(all=True, filters={"label": ours})

    def _config_networks(self, service_id: uuid.UUID) -> list[dict]:
        return self._api.networks(filters={"label": [f"{SERVICE_LABEL}={service_id}", SWARM_TARGET_LABEL]})

    def _scale(self, service: Mapping, replicas: int, pull_auth: Mapping[str, str] | None = None) -> None:
        spec = dict(service["Spec"])
        spec["Mode"] = {"Replicated": {"Replicas": replicas}}
        self._update(service, spec, pull_auth)

    def _update(self, service: Mapping, spec: dict, pull_auth: Mapping[str, str] | None) -> None:
        """Update the swarm service to ``spec``; with ``pull_auth``, also the registry auth its
        new tasks pull with (and the label that says when)."""
        headers = {}
        if pull_auth:
            image = str(((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image") or "")
            headers = {"X-Registry-Auth": _auth_header(pull_auth, image)}
            spec["Labels"] = {**(spec.get("Labels") or {}), PULL_AUTH_LABEL: str(int(time.time()))}
        url = self._api._url("/services/{0}/update", service["ID"])
        version = {"version": service["Version"]["Index"]}
        self._api._result(self._api._post_json(url, params=version, data=spec, headers=headers))

    @_in_time
    @_bounded
    def renew_pull_auth(self, pull_auth: Mapping[str, str]) -> None:
        """Give the generations ``observe`` saw serving or starting ``pull_auth`` anew where
        theirs is older than PULL_AUTH_RENEW_SECONDS (an update the engine refuses, one made
        meanwhile by another pass say, is tried again by the next pass)."""
        if not pull_auth:
            return
        for service in self._observed.values():
            self._check_time()
            labels = service["Spec"].get("Labels") or {}
            try:
                since = time.time() - float(labels.get(PULL_AUTH_LABEL, "0"))
            except (TypeError, ValueError):
                since = math.inf
            if since < PULL_AUTH_RENEW_SECONDS:
                continue
            service_id = str(labels.get(SERVICE_LABEL, ""))[:64]
            try:
                self._update(service, dict(service["Spec"]), pull_auth)
            except docker.errors.APIError as exc:  # out of sequence (updated meanwhile), or refused
                log.warning("deploy.pull_auth_not_renewed", extra={"service": service_id, "status": exc.status_code})
                continue
            log.info("deploy.pull_auth_renewed", extra={"service": service_id})

    def _generations(self, service_id: uuid.UUID, wanted: set[int | None]) -> list[tuple[int, dict]]:
        """The service's swarm services by generation (its label), one a generation: the
        ``wanted`` generations', and at most MAX_OTHER_GENERATIONS others, the newest."""
        found: dict[int, dict] = {}
        for service in self._services(service_id):
            labels = service["Spec"].get("Labels") or {}
            try:
                generation = int(labels.get(GENERATION_LABEL, "0"))
            except (ValueError, TypeError):
                generation = 0
            found.setdefault(generation, service)
        others = sorted((g for g in found if g not in wanted), reverse=True)[:MAX_OTHER_GENERATIONS]
        return [(g, found[g]) for g in sorted(found) if g in wanted or g in others]

    def _replica(self, task: Mapping, generation: int, image_id: str | None, *, probe: bool = True) -> Replica:
        status = task.get("Status") or {}
        container_id = (status.get("ContainerStatus") or {}).get("ContainerID")
        if container_id:
            self._task_container[task["ID"]] = container_id
            self._task_node[task["ID"]] = str(task.get("NodeID") or "")
        address = None
        if status.get("State") == "running" and container_id and self._published_host:
            address = self._published(task, status)
        elif status.get("State") == "running" and container_id and (ip := self._address(container_id)):
            address = f"{ip}:{REPLICA_PORT}"
        return Replica(
            id=task["ID"],
            generation=generation,
            image_id=image_id,
            address=address,
            alive=True,  # swarm keeps it running, or replaces it
            ready=probe and address is not None and answers(address),
            exit_code=(status.get("ContainerStatus") or {}).get("ExitCode"),
            created=_timestamp(task.get("CreatedAt")),
        )

    def _address(self, container_id: str) -> str | None:
        """The task's address on its service bridge: from its container on this node (the
        task's own network attachment carries none on a swarm-scoped bridge)."""
        try:
            info = self._api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        if not (info.get("State") or {}).get("Running"):
            return None
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        return next((n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), None)

    def _why_it_failed(self, service: Mapping, failed: Sequence[Mapping], *, node: str | None = None) -> Failure:
        """Why the tasks ``failed`` (on ``node``, named unless it is the one the worker talks to)."""
        last = max(failed, key=lambda t: _timestamp((t.get("Status") or {}).get("Timestamp")))
        status = last.get("Status") or {}
        # Read whole, not streamed as docker-py's service_logs does: its stream reader wants the
        # connection's socket, which a tenant's engine's bounded adapter does not hand out.
        params = {"stdout": 1, "stderr": 1, "tail": _LOG_TAIL}
        try:
            answer = self._api._get(self._api._url("/services/{0}/logs", service["ID"]), params=params)
            self._api._raise_for_status(answer)  # an error's body is no log
            logs = b"".join(self._api._multiplexed_buffer_helper(answer)).decode("utf-8", "replace")
        except docker.errors.APIError:
            logs = ""
        code = (status.get("ContainerStatus") or {}).get("ExitCode")
        times = f"{len(failed)} times before one answered GET /"
        on = f" on node {node[:64]}" if node and node != self._node_id else ""
        if status.get("State") == "rejected" or not code:
            reason = f"swarm could not run a replica{on} {times}: {status.get('Err') or status.get('Message')}"
        else:
            reason = f"a replica exited with code {code}{on} {times}{last_error_line(logs)}"
        return Failure(reason, logs.rstrip())

    def _ensure_network(self, service_id: uuid.UUID) -> str:
        """The service's swarm-scoped bridge, made when missing (idempotent) from its
        config-only network, itself made on a free /27 of the pool."""
        name = network_name(service_id)
        config = self._ensure_config_network(service_id)
        with suppress(docker.errors.NotFound):
            found = self._api.inspect_network(name)
            if (found.get("ConfigFrom") or {}).get("Network") != config or found.get("Scope") != "swarm":
                raise ServiceNetworkError(
                    f"network {name} exists but is not made from {config}: remove it (docker network rm {name})"
                )
            return name
        body = {
            "Name": name,
            "Driver": "bridge",
            "Scope": "swarm",
            "ConfigFrom": {"Network": config},
            "CheckDuplicate": True,
        }
        try:
            self._api._result(self._api._post_json(self._api._url("/networks/create"), data=body))
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: a concurrent pass made it
                raise ServiceNetworkError(f"the engine refused network {name}: {exc.explanation or exc}") from None
        return name

    def _ensure_config_network(self, service_id: uuid.UUID) -> str:
        name = config_network_name(service_id)
        with suppress(docker.errors.NotFound):
            return _checked_config(self._api.inspect_network(name), service_id)
        slots, free = free_slots(self._api, self._pool)
        for slot in free:
            body = {
                "Name": name,
                "ConfigOnly": True,
                "Options": {_BRIDGE_OPTION: bridge_name(service_id)},
                "IPAM": {"Driver": "default", "Config": [{"Subnet": str(slot), "Gateway": str(next(slot.hosts()))}]},
                "Labels": {
                    SERVICE_LABEL: str(service_id),
                    INSTALLATION_LABEL: self._installation,
                    **dict([SWARM_TARGET_LABEL.split("=", 1)]),
                },
                "CheckDuplicate": True,
            }
            try:
                self._api._result(self._api._post_json(self._api._url("/networks/create"), data=body))
            except docker.errors.APIError as exc:
                with suppress(docker.errors.NotFound):  # a concurrent pass made it first
                    return _checked_config(self._api.inspect_network(name), service_id)
                raise ServiceNetworkError(
                    f"the engine refused network {name} on {slot}: {exc.explanation or exc}"
                ) from None
            # The engine checks no overlap for a config-only network: a concurrent worker may
            # have taken the slot; the later of the two moves on.
            if self._slot_taken_by_another(name, slot):
                with suppress(docker.errors.NotFound, docker.errors.APIError):
                    self._api.remove_network(name)
                continue
            return name
        raise ServiceNetworkError(
            f"no free /{slots[0].prefixlen} left in the service subnet pool {self._pool}: delete unused "
            "services, or set MMS_SERVICE_SUBNET_POOL to a larger range no other network uses"
        )

    def _slot_taken_by_another(self, name: str, slot: ipaddress.IPv4Network) -> bool:
        mine = self._api.inspect_network(name)
        for network in self._api.networks():
            if network["Id"] == mine["Id"] or (network.get("ConfigFrom") or {}).get("Network") == name:
                continue
            for config in (network.get("IPAM") or {}).get("Config") or []:
                with suppress(ValueError, TypeError):
                    if slot.overlaps(ipaddress.ip_network(config.get("Subnet") or "", strict=False)):
                        return network.get("Created", "") <= mine.get("Created", "")
        return False


def _checked_config(network: Mapping, service_id: uuid.UUID) -> str:
    """The config-only network's name, after checking it is what this module makes: another
    one of that name would put the tasks outside the firewall."""
    name = network.get("Name", "")
    configs = (network.get("IPAM") or {}).get("Config") or []
    if (
        not network.get("ConfigOnly")
        or (network.get("Labels") or {}).get(SERVICE_LABEL) != str(service_id)
        or (network.get("Options") or {}).get(_BRIDGE_OPTION) != bridge_name(service_id)
        or len(configs) != 1
        or not configs[0].get("Subnet")
    ):
        raise ServiceNetworkError(
            f"network {name} exists but is not the service's config-only network (label, bridge "
            f"{bridge_name(service_id)}, one subnet): remove it (docker network rm {name})"
        )
    return name


def _node_address(node: Mapping) -> str | None:
    """A node's ``Status.Addr``, if it is an IP address (written as Python writes it)."""
    status = node.get("Status")
    address = status.get("Addr") if isinstance(status, Mapping) else None
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else None
    except ValueError:
        return None
    # A scope (``fe80::1%eth0``) is text of the engine's choosing, of any length: no address of a node.
    return None if ip is None or getattr(ip, "scope_id", None) else str(ip)


def published_address(host: str, status: Mapping, *, ports: frozenset[int] | None = None) -> str | None:
    """A tenant's task's address: ``host`` (the manager's, as the worker checked it) and the port
    the task publishes in host mode for the replica port, if it is one of ``ports`` (None: any).
    Only the port is the engine's word: never an address the engine names."""
    published = published_port(status)
    if published is None or (ports is not None and published not in ports):
        return None
    return f"{host}:{published}"  # read with rpartition(":"), v6 too


def published_port(status: Mapping) -> int | None:
    """The port a tenant's task publishes in host mode for the replica port, if the engine names
    one that is a port (an int in 1..65535)."""
    listed = (status.get("PortStatus") or {}).get("Ports") if isinstance(status, Mapping) else None
    for port in listed if isinstance(listed, list) else []:
        if not isinstance(port, Mapping):
            continue
        published = port.get("PublishedPort")
        if (
            port.get("TargetPort") == REPLICA_PORT
            and port.get("PublishMode") == "host"
            and type(published) is int
            and 0 < published < 65536
        ):
            return published
    return None


def _failing_node(failed: Sequence[Mapping], ready_on: set) -> str | None:
    """A node where MAX_FAILED_TASKS of the generation's tasks failed and none of its tasks
    answered: swarm goes on placing tasks there (one that cannot pull the image: `No such
    image`, every few seconds) whatever the other nodes' tasks do, so it fails the generation
    on its own."""
    counts = Counter(str(task.get("NodeID") or "") for task in failed)
    return next((n for n, count in counts.items() if n and count >= MAX_FAILED_TASKS and n not in ready_on), None)


def _running_first(task: Mapping) -> tuple[bool, float, str]:
    """Running tasks first, then the newest: those a pass keeps of more than it acts on."""
    status, created = task.get("Status") or {}, task.get("CreatedAt")
    running = isinstance(status, Mapping) and status.get("State") == "running"
    return not running, -_timestamp(created if isinstance(created, str) else None), str(task.get("ID"))


def _replicas_of(service: Mapping) -> int:
    return int(((service["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas") or 0)


def _auth_header(auth: Mapping[str, str], image: str) -> str:
    """X-Registry-Auth, as the engine reads it: URL-safe base64 of the auth config's JSON."""
    config = {**auth, "serveraddress": registry_host(image)}
    return base64.urlsafe_b64encode(json.dumps(config).encode()).decode()


_FRACTION = re.compile(r"(\.\d{6})\d*")


def _timestamp(value: str | None) -> float:
    """Seconds since the epoch of the engine's RFC 3339 time (nanoseconds cut to micro)."""
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(_FRACTION.sub(r"\1", value)).timestamp()
    except ValueError:
        return 0.0


__all__ = ["SwarmDriver", "config_network_name", "published_address", "swarm_service_name"]
