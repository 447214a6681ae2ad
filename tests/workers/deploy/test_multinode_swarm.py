"""A two-node swarm (tests/workers/deploy/netns_swarm_pair.py): what the multi-node design
(docs/design/web-services.md, "Multi-node swarm (measured, 2026-12-04)") relies on.

An ``--internal`` overlay carries a task on node 2 to a task on node 1 and to nothing else: not
the nodes' engines, not the host's services on the nodes' network. The control: the same probes
from a task on an overlay that is not internal reach them all (docker_gwbridge masquerades), so a
refused probe is the network's doing, not the probe's. And the fixture leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from app.deployments.reconciler import Spec
from app.deployments.states import ServiceState
from app.orm.base import utcnow
from tests.infra import Infra
from tests.workers.deploy.netns_swarm import usable
from tests.workers.deploy.netns_swarm_pair import SwarmNode, TwoNodeSwarm, still_there, two_node_swarm
from workers.deploy.swarm import SwarmDriver

pytestmark = pytest.mark.skipif(usable() is not None, reason=f"no tenant swarm here: {usable()}")

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


@pytest.fixture(scope="module")
def swarm(infra: Infra) -> Iterator[TwoNodeSwarm]:
    with two_node_swarm(registry_ports=[int(infra.registry.rpartition(":")[2])]) as made:
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
    location, _, digest = image.partition("@")
    spec = Spec(
        id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        state=ServiceState.TRANSITIONING,
        compute_type="swarm",
        compute_name="swarm",
        compute_attached=False,
        image_id=uuid.uuid4(),
        image_location=location,
        image_digest=digest,
        generation=1,
        traffic_generation=None,
        replicas=4,
        cpu=0.1,
        memory_gb=0.1,
        scoring_timeout_ms=1000,
        revision=1,
        changed_at=utcnow(),
        switched_at=None,
    )
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
