"""A two-node swarm (tests/workers/deploy/netns_swarm_pair.py): what the multi-node design
(docs/design/web-services.md, "Multi-node swarm (measured, 2026-12-04)") relies on.

An ``--internal`` overlay carries a task on node 2 to a task on node 1 and to nothing else: not
the nodes' engines, not the host's services on the nodes' network. The control: the same probes
from a task on an overlay that is not internal reach them all (docker_gwbridge masquerades), so a
refused probe is the network's doing, not the probe's. And the fixture leaves nothing behind.

The drivers on it: ours keeps every task on the node it talks to; a tenant's spreads them over
the nodes whose address the gateway may route to and whose engine proves the node the tenant's
(its certificates from the tenant's CA), each replica reached at its node's address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from app.context import ServiceContext
from app.deployments.reconciler import Replica, Spec
from tests.infra import Infra
from tests.workers.deploy.netns_swarm import _Forwarder
from tests.workers.deploy.netns_swarm_pair import SwarmNode, TwoNodeSwarm, still_there, two_node_swarm
from tests.workers.deploy.specs import swarm_spec
from workers.deploy import swarm as swarm_module
from workers.deploy.swarm import PULL_AUTH_LABEL, SwarmDriver
from workers.deploy.tenant_swarm import swarm_driver_at

pytestmark = pytest.mark.usefixtures("swarm_tools")  # tests/workers/deploy/conftest.py

# Each argument host:port: prints {argument: "connected" | the error's errno name}.
_PROBE = r"""
import errno, json, socket, sys
out = {}
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, int(port)))
        out[target] = "connected"
    except TimeoutError:
        out[target] = "timeout"
    except OSError as exc:
        out[target] = errno.errorcode.get(exc.errno, str(exc.errno))
    finally:
        s.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def image(infra: Infra) -> str:
    """The base image (python3) in the open registry, by digest: each node pulls it."""
    reference = f"{infra.registry}/{infra.prefix}/multinode"
    with infra.api() as api:
        api.tag(infra.base_image, reference, "py3.11")
        chunks = list(api.push(reference, tag="py3.11", stream=True, decode=True))
        digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c)
        api.remove_image(f"{reference}:py3.11")
    infra.pushed.append((infra.registry, f"{infra.prefix}/multinode", digest))
    return f"{reference}@{digest}"


def _serving(infra: Infra, registry: str, auth: dict[str, str] | None = None) -> str:
    """The base image serving GET / on the replica port (python3 -m http.server) in
    ``registry``, by digest."""
    reference = f"{registry}/{infra.prefix}/multinode-serving"
    with infra.api() as api:
        made = api.create_container(infra.base_image, command=["true"])
        try:
            api.commit(made["Id"], reference, "v1", changes=['CMD ["python3", "-m", "http.server", "5001"]'])
        finally:
            api.remove_container(made["Id"])
        chunks = list(api.push(reference, tag="v1", stream=True, decode=True, auth_config=auth))
        digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c)
        api.remove_image(f"{reference}:v1")
    infra.pushed.append((registry, f"{infra.prefix}/multinode-serving", digest))
    return f"{reference}@{digest}"


@pytest.fixture(scope="module")
def serving_image(infra: Infra) -> str:
    return _serving(infra, infra.registry)


@pytest.fixture(scope="module")
def swarm(infra: Infra) -> Iterator[TwoNodeSwarm]:
    # One tenant's nodes: the worker node's certificates from the manager's CA, so its engine
    # proves it with the tenant's TLS material (workers/deploy/tenant_swarm.py prove_node).
    with two_node_swarm(registry_ports=[int(infra.registry.rpartition(":")[2])], shared_ca=True) as made:
        yield made


@pytest.fixture
def host_listener(swarm: TwoNodeSwarm) -> Iterator[int]:
    """A host service on the host's address on the nodes' network: its port."""
    listener = socket.create_server((swarm.host_address, 0))
    listener.settimeout(0.5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                listener.accept()[0].close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    listener.close()


def test_an_internal_overlay_carries_node_2_to_node_1_and_reaches_no_engine_and_no_host(
    swarm: TwoNodeSwarm, image: str, host_listener: int
) -> None:
    manager, worker = swarm.nodes
    node_ids = {n["Status"]["Addr"]: n["ID"] for n in manager.api.nodes()}
    assert set(node_ids) == {manager.address, worker.address}  # each node's engine reports its own
    outside = [f"{manager.address}:2376", f"{worker.address}:2376", f"{swarm.host_address}:{host_listener}"]
    for internal in (True, False):
        network = f"mn-{'internal' if internal else 'open'}"
        manager.api.create_network(network, driver="overlay", internal=internal)
        try:
            one = _task(manager, image, f"{network}-1", network, node_ids[manager.address])
            two = _task(manager, image, f"{network}-2", network, node_ids[worker.address])
            one_ip = one["NetworksAttachments"][0]["Addresses"][0].split("/")[0]
            probed = _probe(worker, two["Status"]["ContainerStatus"]["ContainerID"], f"{one_ip}:5001", *outside)
            assert probed.pop(f"{one_ip}:5001") == "connected", probed  # across the nodes: vxlan
            if internal:
                assert probed == dict.fromkeys(outside, "ENETUNREACH"), probed
            else:  # the control: the probe reaches them where the network lets it
                assert probed == dict.fromkeys(outside, "connected"), probed
        finally:
            for name in (f"{network}-1", f"{network}-2"):
                with contextlib.suppress(docker.errors.NotFound):
                    manager.api.remove_service(name)
            _remove_network(manager, network)


def test_our_swarm_drivers_tasks_stay_on_the_node_it_talks_to(swarm: TwoNodeSwarm, image: str) -> None:
    """The ``swarm`` target on a swarm a second node joined: each service's network is made from
    a config-only network on the node the worker talks to, which the other node lacks (a task
    placed there is rejected, again and again: `configuration network ... does not exist`), and
    the gateway reaches only that node's bridges. So every task is placed on that node."""
    manager = swarm.manager
    spec = _spec(image, replicas=4, compute_name="swarm")
    driver = SwarmDriver(
        f"unix://{swarm.root / 'n1' / 'docker.sock'}", installation="multinode-test", subnet_pool="10.213.0.0/16",
        tmp_mb=16, pids=64,
    )  # fmt: skip
    try:
        driver.start(spec, 4, None)
        (service,) = manager.api.services(filters={"label": f"org.mms.service={spec.id}"})
        manager_id = manager.api.info()["Swarm"]["NodeID"]
        deadline = time.monotonic() + 60
        while len(placed := [t for t in manager.api.tasks(filters={"service": service["ID"]}) if t.get("NodeID")]) < 4:
            assert time.monotonic() < deadline, placed
            time.sleep(0.5)
        time.sleep(3)  # a task on the other node is rejected within a second or two
        tasks = manager.api.tasks(filters={"service": service["ID"]})
        assert {t["NodeID"] for t in tasks if t.get("NodeID")} == {manager_id}, [
            (t.get("NodeID"), t["Status"].get("Err")) for t in tasks
        ]
        assert [t for t in tasks if t["Status"]["State"] == "rejected"] == []
    finally:
        driver.remove_all(spec.id)
        driver.close()


def test_a_node_whose_engine_another_ca_certified_is_not_proven_and_gets_no_task(
    infra: Infra, serving_image: str, service_context: ServiceContext
) -> None:
    """Each node's certificates from a CA of its own: the worker node's engine is not the
    tenant's by its TLS material (the manager's), so, both addresses allowed, it is not proven:
    new tasks are kept off it (``node.id!=``) and both replicas run on the manager, at the
    address the worker checked."""
    with two_node_swarm(registry_ports=[int(infra.registry.rpartition(":")[2])]) as pair:
        manager, worker = pair.nodes
        spec = _spec(serving_image, replicas=2)
        allow = [manager.address, worker.address]
        with _tenant(service_context, pair, allow=allow) as open_driver:
            try:
                open_driver.start(spec, 2, None)
                ready = _until_ready(service_context, pair, allow, spec, 2)
                (service,) = manager.api.services(filters={"label": f"org.mms.service={spec.id}"})
                worker_id = worker.api.info()["Swarm"]["NodeID"]
                manager_id = manager.api.info()["Swarm"]["NodeID"]
                assert service["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == [f"node.id!={worker_id}"]
                assert {_node_of(manager, r) for r in ready} == {manager_id}
                assert all(r.address and r.address.startswith(f"{manager.address}:") for r in ready)
            finally:
                open_driver.remove_all(spec.id)


def test_a_tenants_replicas_spread_over_its_nodes_each_at_its_nodes_address_and_their_logs_copied(
    swarm: TwoNodeSwarm, serving_image: str, service_context: ServiceContext
) -> None:
    """Both nodes' addresses allowed (as addresses: private here): swarm places one replica on
    each node, and each is recorded at its node's address and the port the engine reported
    for it, and answers there (from the host, where the gateway runs)."""
    manager, worker = swarm.nodes
    spec = _spec(serving_image, replicas=2)
    with _tenant(service_context, swarm, allow=[manager.address, worker.address]) as open_driver:
        try:
            open_driver.start(spec, 2, None)
            ready = _until_ready(service_context, swarm, [manager.address, worker.address], spec, 2)
            (service,) = manager.api.services(filters={"label": f"org.mms.service={spec.id}"})
            assert service["Spec"]["TaskTemplate"].get("Placement", {}).get("Constraints") in (None, [])
            tasks = {t["ID"]: t for t in manager.api.tasks(filters={"service": service["ID"]})}
            node_address = {n["ID"]: n["Status"]["Addr"] for n in manager.api.nodes()}
            assert sorted(node_address[tasks[r.id]["NodeID"]] for r in ready) == sorted(
                [manager.address, worker.address]
            )
            for replica in ready:
                task = tasks[replica.id]
                published = task["Status"]["PortStatus"]["Ports"][0]["PublishedPort"]
                assert replica.address == f"{node_address[task['NodeID']]}:{published}"
                assert httpx.get(f"http://{replica.address}/", timeout=5).status_code == 200
            # Each replica's log lines are copied, the one on the other node's too (swarm's task
            # logs, through the manager): http.server logs each GET / it answered.
            ids = {r.id for r in ready}
            with _tenant(service_context, swarm, allow=[manager.address, worker.address]) as driver:
                seen, _ = driver.observe(spec)
                lines = driver.read_logs(spec, [r for r in seen if r.id in ids])
            assert {line.replica_id for line in lines} == ids, lines
            for replica_id in ids:
                assert any('"GET / HTTP/1.1" 200' in ln.text for ln in lines if ln.replica_id == replica_id), lines
            # A second pass copies only what came after the newest line it has.
            marks = {i: max(line.logged_ns for line in lines if line.replica_id == i) for i in ids}
            later = dataclasses.replace(spec, log_marks=marks)
            with _tenant(service_context, swarm, allow=[manager.address, worker.address]) as driver:
                seen, _ = driver.observe(later)
                again = driver.read_logs(later, [r for r in seen if r.id in ids])
            assert all(line.logged_ns > marks[line.replica_id] for line in again), again
        finally:
            open_driver.remove_all(spec.id)


def test_a_renewed_pull_token_restarts_no_running_task(
    swarm: TwoNodeSwarm, serving_image: str, service_context: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal (workers/deploy/swarm.py ``renew_pull_auth``) updates the swarm service's
    registry auth and its label only: swarm keeps every running task (a task's pull options do
    not make it out of date), on both nodes."""
    manager, worker = swarm.nodes
    allow = [manager.address, worker.address]
    spec = _spec(serving_image, replicas=2)
    with _tenant(service_context, swarm, allow=allow) as open_driver:
        try:
            open_driver.start(spec, 2, {"registrytoken": "first"})
            ready = _until_ready(service_context, swarm, allow, spec, 2)
            (before,) = manager.api.services(filters={"label": f"org.mms.service={spec.id}"})
            monkeypatch.setattr(swarm_module, "PULL_AUTH_RENEW_SECONDS", 0.0)
            with _tenant(service_context, swarm, allow=allow) as driver:
                driver.observe(spec)
                driver.renew_pull_auth({"registrytoken": "second"})
            (after,) = manager.api.services(filters={"label": f"org.mms.service={spec.id}"})
            assert after["Version"]["Index"] > before["Version"]["Index"]  # updated
            assert float(after["Spec"]["Labels"][PULL_AUTH_LABEL]) >= float(before["Spec"]["Labels"][PULL_AUTH_LABEL])
            time.sleep(5)  # a restart would show by now: the old tasks shut down, new ones made
            running = [
                t["ID"] for t in manager.api.tasks(filters={"service": after["ID"]}) if t["DesiredState"] == "running"
            ]
            assert sorted(running) == sorted(r.id for r in ready)
        finally:
            open_driver.remove_all(spec.id)


def test_a_tenant_node_whose_address_is_refused_gets_no_task_and_no_route(
    swarm: TwoNodeSwarm, serving_image: str, service_context: ServiceContext
) -> None:
    """The worker node's address not allowed: a task already there (placed while it was) is
    given no address, the manager's is; a new generation's tasks all go to the manager (a
    ``node.id!=`` constraint for the worker node)."""
    manager, worker = swarm.nodes
    worker_id = worker.api.info()["Swarm"]["NodeID"]
    both, manager_only = [manager.address, worker.address], [manager.address]
    first = _spec(serving_image, replicas=2)
    with _tenant(service_context, swarm, allow=both) as driver:
        try:
            driver.start(first, 2, None)
            _until_ready(service_context, swarm, both, first, 2)
            with _tenant(service_context, swarm, allow=manager_only) as narrower:
                replicas, failure = narrower.observe(first)
            by_node = {_node_of(manager, r): r.address for r in replicas}
            assert by_node[worker_id] is None and failure is None
            assert [a for a in by_node.values() if a] == [by_node[manager.api.info()["Swarm"]["NodeID"]]]
            assert by_node[manager.api.info()["Swarm"]["NodeID"]].startswith(f"{manager.address}:")

            second = dataclasses.replace(first, generation=2)
            with _tenant(service_context, swarm, allow=manager_only) as narrower:
                narrower.start(second, 2, None)
            ready = _until_ready(service_context, swarm, manager_only, second, 2)
            (service,) = [
                s
                for s in manager.api.services(filters={"label": f"org.mms.service={first.id}"})
                if s["Spec"]["Labels"]["org.mms.generation"] == "2"
            ]
            assert service["Spec"]["TaskTemplate"]["Placement"]["Constraints"] == [f"node.id!={worker_id}"]
            tasks = manager.api.tasks(filters={"service": service["ID"]})
            assert {t.get("NodeID") for t in tasks} == {manager.api.info()["Swarm"]["NodeID"]}
            assert all(r.address and r.address.startswith(f"{manager.address}:") for r in ready)
            assert not any(worker.address in str(r.address) for r in ready)
        finally:
            driver.remove_all(first.id)


def test_a_tenant_node_that_cannot_pull_fails_the_generation_naming_it_though_the_manager_answers(
    swarm: TwoNodeSwarm, infra: Infra, service_context: ServiceContext
) -> None:
    """The image is in a registry only the manager reaches (here: the password registry, forwarded
    into the manager's namespace only): the manager pulls it and its task answers; the worker
    node's tasks are rejected again and again. Those rejections are counted on their own: the
    generation fails, naming the node, though a replica answered."""
    manager, worker = swarm.nodes
    worker_id = worker.api.info()["Swarm"]["NodeID"]
    image = _serving(infra, infra.auth_registry, infra.basic_auth())
    forwarder = _Forwarder(manager.netns, int(infra.auth_registry.rpartition(":")[2]))
    allow = [manager.address, worker.address]
    spec = _spec(image, replicas=2)
    try:
        with _tenant(service_context, swarm, allow=allow) as driver:
            driver.start(spec, 2, infra.basic_auth())
        deadline = time.monotonic() + 90
        while True:
            with _tenant(service_context, swarm, allow=allow) as driver:
                replicas, failure = driver.observe(spec)
            if failure is not None:
                break
            assert time.monotonic() < deadline, replicas
            time.sleep(1)
        assert f"swarm could not run a replica on node {worker_id} 3 times" in failure.reason, failure
        assert [_node_of(manager, r) for r in replicas if r.ready] == [manager.api.info()["Swarm"]["NodeID"]]
    finally:
        with _tenant(service_context, swarm, allow=allow) as driver:
            driver.remove_all(spec.id)
        forwarder.stop()


def test_the_two_node_swarm_leaves_nothing_behind_even_after_a_failure(infra: Infra) -> None:
    made: list[TwoNodeSwarm] = []
    with (
        pytest.raises(RuntimeError, match="a test failed here"),
        two_node_swarm(registry_ports=[int(infra.registry.rpartition(":")[2])]) as swarm,
    ):
        made.append(swarm)
        assert swarm.worker.api.info()["Swarm"]["LocalNodeState"] == "active"
        assert still_there(swarm.names) == swarm.names
        pids = [int((swarm.root / node / "dockerd.pid").read_text()) for node in ("n1", "n2")]
        raise RuntimeError("a test failed here")
    (swarm,) = made
    assert still_there(swarm.names) == []
    assert [pid for pid in pids if _state(pid) not in ("gone", "Z")] == []
    assert not swarm.root.exists()
    assert str(swarm.root) not in Path("/proc/mounts").read_text()


def _spec(image: str, *, replicas: int, compute_name: str = "theirs") -> Spec:
    location, _, digest = image.partition("@")
    return dataclasses.replace(
        swarm_spec(compute_name),
        image_location=location,
        image_digest=digest,
        replicas=replicas,
        cpu=0.1,
        memory_gb=0.1,
        scoring_timeout_ms=1000,
    )


@contextlib.contextmanager
def _tenant(context: ServiceContext, swarm: TwoNodeSwarm, *, allow: list[str]) -> Iterator[SwarmDriver]:
    """The tenant driver on the swarm's manager, the operator allowing ``allow`` (addresses)."""
    settings = context.settings.model_copy(update={"fetch_allow_hosts": allow})
    allowed = ServiceContext.build(settings)
    try:
        with swarm_driver_at(
            allowed,
            docker_host=swarm.manager.docker_host,
            tls=swarm.manager.tls,
            installation="multinode-tenant",
            target="compute 'theirs'",
        ) as driver:
            yield driver
    finally:
        allowed.dispose()


def _until_ready(
    context: ServiceContext, swarm: TwoNodeSwarm, allow: list[str], spec: Spec, count: int
) -> list[Replica]:
    """The spec's generation's replicas once ``count`` answer GET / (a pass a look, as the
    reconciler's)."""
    deadline = time.monotonic() + 120
    while True:
        with _tenant(context, swarm, allow=allow) as driver:
            replicas, failure = driver.observe(spec)
        ready = [r for r in replicas if r.generation == spec.generation and r.ready]
        if len(ready) >= count:
            return ready
        assert failure is None, failure
        assert time.monotonic() < deadline, replicas
        time.sleep(1)


def _node_of(manager: SwarmNode, replica: Replica) -> str:
    return manager.api.inspect_task(replica.id)["NodeID"]


def _task(manager: SwarmNode, image: str, name: str, network: str, node_id: str) -> dict:
    """A swarm service of one task on ``node_id`` serving HTTP on 5001: its running task."""
    template = {
        "ContainerSpec": {"Image": image, "Command": ["python3", "-m", "http.server", "5001"]},
        "Placement": {"Constraints": [f"node.id=={node_id}"]},
        "Networks": [{"Target": network}],
    }
    body = {"Name": name, "TaskTemplate": template, "EndpointSpec": {"Mode": "dnsrr"}}
    created = manager.api._result(manager.api._post_json(manager.api._url("/services/create"), data=body), json=True)
    deadline = time.monotonic() + 120
    while True:
        tasks = manager.api.tasks(filters={"service": created["ID"], "desired-state": "running"})
        # Running, with its container named (the manager's view can lag the node's a moment).
        running = [
            t for t in tasks if t["Status"]["State"] == "running" and t["Status"]["ContainerStatus"].get("ContainerID")
        ]
        if running:
            return running[0]
        assert time.monotonic() < deadline, tasks
        time.sleep(0.5)


def _probe(node: SwarmNode, container: str, *targets: str) -> dict[str, str]:
    made = node.api.exec_create(container, ["python3", "-c", _PROBE, *targets])
    return json.loads(node.api.exec_start(made).decode().strip().splitlines()[-1])


def _remove_network(manager: SwarmNode, network: str) -> None:
    """Once its tasks are gone (a network in use is refused for a moment)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            manager.api.remove_network(network)
            return
        except docker.errors.NotFound:
            return
        except docker.errors.APIError:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
