"""Where the gateway may send a tenant swarm's traffic, and what its pass leaves behind, against
the hostile TLS engine on 127.0.0.1 of tests/workers/deploy/test_tenant_swarm_bounds.py.

The attack (from a review): an operator allows a tenant's manager by name in
MMS_FETCH_ALLOW_HOSTS, the tenant points the name at a private address of its choosing (where
another tenant's replica answers, or will), its engine reports a task on whatever port it
likes, and the gateway routes the tenant's keyless traffic there, around the other service's
key; the route outlived the engine, since an unreachable pass kept its replica rows. So: a task
is published only at a public address or one the operator allows as an address, on a port that
entry allows, never in MMS_SERVICE_SUBNET_POOL, and a tenant swarm away leaves no route."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.addresses import in_service_pool
from app.context import ServiceContext
from app.deployments.cluster_cleanup import Cleanup
from app.main import create_app
from app.orm import ServiceReplica
from app.orm.base import utcnow
from tests.api.test_manifests import seed_manifest
from tests.api.test_services import built_image
from tests.factories import Callers, model_body, new_account
from tests.listeners import tcp_listener
from tests.workers.deploy.specs import swarm_spec
from tests.workers.deploy.test_tenant_swarm_bounds import NAME, Answer, _Engine, certs, engine  # noqa: F401
from workers.deploy import cluster_cleanup, tenant_swarm
from workers.deploy.local import GENERATION_LABEL, INSTALLATION_LABEL, SERVICE_LABEL, TargetRefused
from workers.deploy.reconcile import installation_id, reconcile_service
from workers.deploy.swarm import published_address
from workers.deploy.tenant_swarm import TLS_FOLDER, node_ports, published_ports, remove_orphaned_tls
from workers.deploy.tenant_swarm import swarm_driver_at as _swarm_driver_at
from workers.fetcher import FetchPolicy
from workers.scratch import _host

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _status(port: object) -> dict:
    return {
        "State": "running",
        "ContainerStatus": {"ContainerID": "c" * 64},
        "PortStatus": {"Ports": [{"TargetPort": 5001, "PublishedPort": port, "PublishMode": "host"}]},
    }


# --- the rule, without an engine ---------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed", "ports"),
    [
        ("203.0.113.7", [], frozenset()),  # TEST-NET: not public either
        ("8.8.8.8", [], None),  # public: any port
        ("10.0.0.5", ["swarm.tenant.example"], frozenset()),  # a name's address: nothing
        ("10.0.0.5", ["swarm.tenant.example:2376"], frozenset()),
        ("10.0.0.5", ["10.0.0.5"], None),  # the address itself: any port
        ("10.0.0.5", ["10.0.0.5:2376"], frozenset({2376})),  # port-scoped: that port only
        ("10.0.0.5", ["10.0.0.5:2376", "10.0.0.5:30001"], frozenset({2376, 30001})),
        ("10.0.0.5", ["10.0.0.6", "10.0.0.50"], frozenset()),
        ("fd00::5", ["[fd00::5]:2376"], frozenset({2376})),
        ("fd00::5", ["fd00:0::5"], None),  # another spelling of the same address
        ("fd00::5", ["[fd00::5]"], None),
        ("::ffff:10.0.0.5", ["10.0.0.5"], frozenset()),  # another address, however it maps
    ],
)
def test_a_task_is_published_only_at_an_address_the_operator_allows_as_such(
    address: str, allowed: list[str], ports: frozenset[int] | None
) -> None:
    assert published_ports(address, allow_hosts=frozenset(allowed)) == ports


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("10.213.0.7", True),
        ("10.213.255.254", True),
        ("::ffff:10.213.0.7", True),
        ("2002:0ad5:0007::1", True),  # 6to4 of 10.213.0.7
        ("64:ff9b::10.213.0.7", True),  # NAT64
        ("10.214.0.7", False),
        ("8.8.8.8", False),
        ("fd00::5", False),
    ],
)
def test_the_operators_service_networks_are_recognised_in_every_form(address: str, inside: bool) -> None:
    assert in_service_pool(address, "10.213.0.0/16") is inside


def test_a_published_port_outside_the_allowed_ones_gives_no_address() -> None:
    assert published_address("10.0.0.5", _status(31000), ports=frozenset({2376})) is None
    assert published_address("10.0.0.5", _status(31000), ports=frozenset()) is None
    assert published_address("10.0.0.5", _status(31000), ports=frozenset({31000})) == "10.0.0.5:31000"
    assert published_address("10.0.0.5", _status(31000), ports=None) == "10.0.0.5:31000"


@pytest.mark.parametrize(
    ("address", "allowed", "ports"),
    [
        ("8.8.8.8", [], None),  # public: any port
        ("10.0.0.6", [], frozenset()),  # the tenant's word alone
        ("10.0.0.6", ["10.0.0.6"], None),
        ("10.0.0.6", ["10.0.0.6:30001"], frozenset({30001})),
        ("10.213.0.7", ["10.213.0.7"], frozenset()),  # the operator's service networks, allowed or not
        ("::ffff:10.213.0.7", ["::ffff:10.213.0.7"], frozenset()),
        ("127.0.0.1", [], frozenset()),
    ],
)
def test_another_nodes_address_is_judged_as_the_managers_and_never_in_the_service_networks(
    address: str, allowed: list[str], ports: frozenset[int] | None
) -> None:
    assert node_ports(address, allow_hosts=frozenset(allowed), pool="10.213.0.0/16") == ports


# --- the driver on a tenant's engine -----------------------------------------------------


def _pem(path: str) -> str:
    return Path(path).read_text()


@pytest.fixture()
def tls(certs: dict[str, str]) -> dict[str, str]:  # noqa: F811
    return {name: _pem(certs[name]) for name in ("ca", "cert", "key")}


def _context(app_context: ServiceContext, tmp_path: Path, **settings: object) -> ServiceContext:
    changed = app_context.settings.model_copy(update={"data_dir": tmp_path / "data", **settings})
    return ServiceContext.build(
        changed,
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )


def _to_loopback(host: str, port: int, *args: object, **kwargs: object) -> list:
    assert host == NAME
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


def _running(labels: dict[str, str], published: int) -> object:
    """An engine that runs one generation of a service whose task publishes ``published``."""
    service = {
        "ID": "s1",
        "Spec": {"Name": "x", "Labels": labels, "Mode": {"Replicated": {"Replicas": 1}}},
        "Version": {"Index": 1},
    }
    task = {"ID": "t1", "DesiredState": "running", "Status": _status(published)}

    def answer(path: str) -> Answer | None:
        if path == "/services":
            return 200, {}, json.dumps([service]).encode()
        if path == "/tasks":
            return 200, {}, json.dumps([task]).encode()
        return None

    return staticmethod(answer)


def _addresses(context: ServiceContext, port: int, tls: dict[str, str], **kwargs: object) -> list[str | None]:
    """The addresses the driver gives the tasks it observes on the manager ``NAME``:``port``."""
    with _swarm_driver_at(
        context,
        docker_host=f"tcp://{NAME}:{port}",
        tls=tls,
        installation="test",
        target="compute 'theirs'",
        resolver=_to_loopback,
        **kwargs,  # type: ignore[arg-type]
    ) as driver:
        replicas, _ = driver.observe(swarm_spec())
    return [r.address for r in replicas]


def test_a_manager_allowed_by_name_gets_no_traffic_whatever_it_resolves_to(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    """The operator allowed the name (the worker may still connect, to remove what runs
    there); its address, a loopback one here, is the tenant's to choose: the gateway gets none
    of it, on no port; a port-scoped address entry allows that port only."""
    port, handler = engine
    handler.hostile = _running({GENERATION_LABEL: "1", INSTALLATION_LABEL: "test"}, published=port + 1)
    by_name = _context(app_context, tmp_path, fetch_allow_hosts=[NAME])
    with pytest.raises(TargetRefused, match="only through its name") as refused:
        _addresses(by_name, port, tls)
    assert "127.0.0.1" not in str(refused.value)  # the address it led to is not the tenant's to learn
    assert _addresses(by_name, port, tls, publish=False) == [None]  # a delete connects, routes nothing

    port_scoped = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, f"127.0.0.1:{port}"])
    assert _addresses(port_scoped, port, tls) == [None]  # the engine's port, not the task's
    both = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    assert _addresses(both, port, tls) == [f"127.0.0.1:{port + 1}"]
    as_address = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1"])
    assert _addresses(as_address, port, tls) == [f"127.0.0.1:{port + 1}"]


def test_a_task_on_a_port_the_operator_does_not_allow_fails_its_generation_saying_why(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    """The engine picks the port a task publishes: with the manager's address allowed at some
    ports only, a task elsewhere can never be routed to, and the pass says so at once rather
    than waiting out the start timeout."""
    port, handler = engine
    handler.hostile = _running({GENERATION_LABEL: "1", INSTALLATION_LABEL: "test"}, published=port + 1)
    port_scoped = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, f"127.0.0.1:{port}"])
    with _swarm_driver_at(
        port_scoped, docker_host=f"tcp://{NAME}:{port}", tls=tls, installation="test", target="t", resolver=_to_loopback
    ) as driver:
        replicas, failure = driver.observe(swarm_spec())
    assert [r.address for r in replicas] == [None]
    assert failure is not None
    assert f"publish port {port + 1}" in failure.reason and f"at port {port} only" in failure.reason
    assert "127.0.0.1" not in failure.reason

    both = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"])
    with _swarm_driver_at(
        both, docker_host=f"tcp://{NAME}:{port}", tls=tls, installation="test", target="t", resolver=_to_loopback
    ) as driver:
        assert driver.observe(swarm_spec())[1] is None  # its port allowed: routed, no failure
    with _swarm_driver_at(
        port_scoped,
        docker_host=f"tcp://{NAME}:{port}",
        tls=tls,
        installation="test",
        target="t",
        resolver=_to_loopback,
        publish=False,
    ) as driver:
        assert driver.observe(swarm_spec())[1] is None  # a delete routes nothing and judges nothing


def test_a_manager_in_the_operators_service_networks_is_refused_even_if_allowed(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    port, handler = engine
    handler.hostile = _running({GENERATION_LABEL: "1", INSTALLATION_LABEL: "test"}, published=port + 1)
    pooled = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1"], service_subnet_pool="127.0.0.0/16")
    for publish in (True, False):
        with pytest.raises(TargetRefused, match="service networks"):
            _addresses(pooled, port, tls, publish=publish)


def _nodes(addresses: dict[str, object], tasks_on: list[str], published: int, rejected_on: list[str] = []) -> object:  # noqa: B006
    """An engine whose swarm has these nodes (ID -> ``Status.Addr``; ``n1`` the manager: see
    _normal's /info) and runs one generation with a task on each node of ``tasks_on``, and a
    task rejected for each of ``rejected_on``."""
    service = {
        "ID": "s1",
        "Spec": {"Name": "x", "Labels": {GENERATION_LABEL: "1", INSTALLATION_LABEL: "test"}},
        "Version": {"Index": 1},
    }
    nodes = [{"ID": node, "Status": {"State": "ready", "Addr": addr}} for node, addr in addresses.items()]
    tasks = [
        {"ID": f"t-{node}", "NodeID": node, "DesiredState": "running", "Status": _status(published)}
        for node in tasks_on
    ]
    tasks += [
        {
            "ID": f"r{n}-{node}",
            "NodeID": node,
            "DesiredState": "shutdown",
            "Status": {"State": "rejected", "Err": "No such image: registry.example.com/a@sha256:0"},
        }
        for n, node in enumerate(rejected_on)
    ]

    def answer(path: str) -> Answer | None:
        listed = {"/services": [service], "/tasks": tasks, "/nodes": nodes}.get(path)
        return None if listed is None else (200, {}, json.dumps(listed).encode())

    return staticmethod(answer)


NODES = {
    "n1": "10.9.9.9",  # the manager: its own claim is not what the gateway uses
    "n2": "127.0.0.2",  # listed as an address
    "n3": "10.213.0.7",  # listed, but in the service networks
    "n4": "10.0.0.9",  # not listed
    "n5": "8.8.8.8",  # public
    "n6": "swarm.tenant.example",  # a name: no address
    "n7": None,
    "n8": "2001:4860::8888%" + "x" * 100,  # public, with a scope of the engine's choosing: no address
}


@pytest.fixture(autouse=True)
def no_proofs_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test proves its nodes afresh (the proofs a worker keeps are per process)."""
    monkeypatch.setattr(tenant_swarm, "_proofs", type(tenant_swarm._proofs)())


@pytest.fixture()
def every_node_proven(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every node the driver asks about is proven (the routing's own tests; the proof has its
    own: test_tenant_swarm_nodes.py); the (node, address) pairs asked about."""
    asked: list[tuple[str, str]] = []

    def proven(node_id: str, address: str, **_: object) -> bool:
        asked.append((node_id, address))
        return True

    monkeypatch.setattr(tenant_swarm, "prove_node", proven)
    return asked


def _tenant_driver(context: ServiceContext, port: int, tls: dict[str, str], compute_path: str | None = None):  # type: ignore[no-untyped-def]
    return _swarm_driver_at(
        context,
        docker_host=f"tcp://{NAME}:{port}",
        tls=tls,
        installation="test",
        target="t",
        resolver=_to_loopback,
        compute_path=compute_path,
    )


def test_a_node_not_proven_gets_no_task_and_no_route_and_is_proven_only_where_it_may_be_routed_to(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another node's address is the tenant's word: even listed or public, a node whose engine
    does not prove it gets no route, and new tasks are kept off it. Only nodes the gateway could
    route to are proven (not one in the service networks, unlisted, or with no address), a
    proof is kept for later passes, and a pass makes at most MAX_PROOFS_A_PASS."""
    asked: list[tuple[str, str]] = []

    def not_proven(node_id: str, address: str, **_: object) -> bool:
        asked.append((node_id, address))
        return False

    monkeypatch.setattr(tenant_swarm, "prove_node", not_proven)
    port, handler = engine
    handler.hostile = _nodes(NODES, list(NODES), published=31000)
    allowed = [NAME, "127.0.0.1", "127.0.0.2", "10.213.0.7", "swarm.tenant.example"]
    context = _context(app_context, tmp_path, fetch_allow_hosts=allowed, service_subnet_pool="10.213.0.0/16")
    with _tenant_driver(context, port, tls) as driver:
        replicas, _ = driver.observe(replace(swarm_spec(), replicas=len(NODES)))
        constraints = driver._constraints()
    assert {r.id: r.address for r in replicas if r.address} == {"t-n1": "127.0.0.1:31000"}
    assert constraints == [f"node.id!=n{i}" for i in range(2, 9)]
    assert sorted(asked) == [("n2", "127.0.0.2"), ("n5", "8.8.8.8")]
    with _tenant_driver(context, port, tls) as driver:  # the next pass: known not proven
        driver.observe(replace(swarm_spec(), replicas=len(NODES)))
    assert len(asked) == 2

    five = {"n1": "10.9.9.9", **{f"m{i}": f"127.0.1.{i}" for i in range(2, 7)}}  # none known yet
    handler.hostile = _nodes(five, [], published=31000)
    wide = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1", *five.values()])
    asked.clear()
    with _tenant_driver(wide, port, tls) as driver:
        assert driver._constraints() == [f"node.id!=m{i}" for i in range(2, 7)]
    assert len(asked) == tenant_swarm.MAX_PROOFS_A_PASS
    with _tenant_driver(wide, port, tls) as driver:
        driver._constraints()
    assert sorted(asked) == sorted((f"m{i}", f"127.0.1.{i}") for i in range(2, 7))  # the rest, later


def test_a_node_not_proven_yet_fails_no_generation_while_one_refused_by_the_rule_does(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The only running task is on node n2: unproven (its engine away a moment, the pass out of
    proofs), the generation waits for its start timeout; at an address the rule refuses, it
    fails at once (the next generation keeps off that node)."""
    monkeypatch.setattr(tenant_swarm, "prove_node", lambda *_, **__: False)
    port, handler = engine
    handler.hostile = _nodes({"n1": "10.9.9.9", "n2": "127.0.0.2"}, ["n2"], published=31000)
    listed = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1", "127.0.0.2"])
    with _tenant_driver(listed, port, tls) as driver:
        replicas, failure = driver.observe(swarm_spec())
    assert [r.address for r in replicas] == [None] and failure is None
    unlisted = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1"])
    with _tenant_driver(unlisted, port, tls) as driver:
        replicas, failure = driver.observe(swarm_spec())
    assert failure is not None and "runs on node n2" in failure.reason


def test_one_tenants_failed_proofs_never_push_out_anothers_proofs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A hostile engine makes up node IDs at addresses that never prove, pass after pass: its
    failures fill its own tenant's share of the kept proofs, not another tenant's."""
    asked: list[str] = []

    def prove(node_id: str, address: str, **_: object) -> bool:
        asked.append(address)
        return address.startswith("8.8.")

    monkeypatch.setattr(tenant_swarm, "prove_node", prove)
    monkeypatch.setattr(tenant_swarm, "MAX_PROOFS_A_PASS", 10_000)

    def judge(material: str) -> tenant_swarm.NodeJudge:
        tls = {"ca": material, "cert": material, "key": material}
        return tenant_swarm.NodeJudge(
            tls=tls, paths={}, policy=FetchPolicy(), allow_hosts=frozenset(), pool="10.213.0.0/16"
        )

    later = time.monotonic() + 60
    honest = judge("honest")
    assert [honest(f"h{i}", f"8.8.8.{i}", later) for i in range(5)] == [None] * 5
    hostile = judge("hostile")
    for i in range(5000):
        assert hostile(f"x{i}", f"9.9.{i // 250}.{i % 250}", later) == frozenset()
    asked.clear()
    again = judge("honest")  # the next pass
    assert [again(f"h{i}", f"8.8.8.{i}", later) for i in range(5)] == [None] * 5
    assert asked == []  # all still known
    assert all(len(kept) <= tenant_swarm._PROOFS_PER_MATERIAL for kept in tenant_swarm._proofs.values())


def test_a_swarm_listing_more_nodes_than_are_judged_stays_on_the_manager_with_none_proven(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
    every_node_proven: list[tuple[str, str]],
) -> None:
    from workers.deploy.swarm import MAX_JUDGED_NODES

    port, handler = engine
    many = {f"n{i}": "8.8.8.8" for i in range(2, MAX_JUDGED_NODES + 3)}
    handler.hostile = _nodes({"n1": "10.9.9.9", **many}, list(many)[:3], published=31000)
    context = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1"])
    with _tenant_driver(context, port, tls) as driver:
        replicas, _ = driver.observe(swarm_spec())
        assert driver._constraints() == ["node.id==n1"]
    assert [r.address for r in replicas] == [None, None, None] and every_node_proven == []


def test_addresses_the_operator_allows_for_one_compute_are_that_computes_alone(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MMS_COMPUTE_ALLOW_HOSTS vouches for private addresses as one compute's, where an
    installation-wide entry vouches for them to every tenant (on an address that several hosts
    share, or that is one tenant's, anyone's swarm could be routed there). That compute's
    manager and nodes there are reached, proven and routed to; the same swarm attached as
    another compute (the account's other one, another tenant's of the same names, a cleanup
    whose compute is not known) is refused as unlisted."""
    policies: list[frozenset[str]] = []

    def proven(node_id: str, address: str, *, policy: FetchPolicy, **_: object) -> bool:
        policies.append(policy.allow_hosts)
        return True

    monkeypatch.setattr(tenant_swarm, "prove_node", proven)
    port, handler = engine
    handler.hostile = _nodes({"n1": "10.9.9.9", "n2": "127.0.0.2"}, ["n1", "n2"], published=31000)
    mine = "/subscriptions/sub-a/resourceGroups/rg/accounts/acct/computes/prod"
    bound = _context(app_context, tmp_path, compute_allow_hosts={mine: [NAME, "127.0.0.1", "127.0.0.2"]})

    theirs_path = "/subscriptions/sub-b/resourceGroups/rg/accounts/acct/computes/prod"
    with _tenant_driver(bound, port, tls, mine.replace("acct", "ACCT")) as tenant:
        replicas, failure = tenant.observe(replace(swarm_spec(), replicas=2))
    assert {r.id: r.address for r in replicas} == {"t-n1": "127.0.0.1:31000", "t-n2": "127.0.0.2:31000"}
    assert failure is None
    assert policies and all("127.0.0.2" in hosts for hosts in policies)  # the node's proof may reach it

    for other in (
        "/subscriptions/sub-a/resourceGroups/rg/accounts/acct/computes/staging",
        "/subscriptions/sub-a/resourceGroups/rg/accounts/acct/computes/Prod",  # compute names are exact
        theirs_path,
        None,
    ):
        with pytest.raises(TargetRefused, match="MMS_COMPUTE_ALLOW_HOSTS"), _tenant_driver(bound, port, tls, other):
            pass
    # A manager the installation allows, whose node is at an address allowed for another compute:
    # that node is neither proven nor routed to for this one.
    policies.clear()
    shared = _context(
        app_context,
        tmp_path,
        fetch_allow_hosts=[NAME, "127.0.0.1"],
        compute_allow_hosts={mine: ["127.0.0.2"]},
    )
    with _tenant_driver(shared, port, tls, theirs_path) as theirs:
        replicas, _ = theirs.observe(replace(swarm_spec(), replicas=2))
        constraints = theirs._constraints()
    assert {r.id: r.address for r in replicas} == {"t-n1": "127.0.0.1:31000", "t-n2": None}
    assert constraints == ["node.id!=n2"] and policies == []
    # Listed for the installation by name, and for another compute as an address: the name lets
    # the worker in, but the address vouches for nothing here, so no route.
    wide = _context(app_context, tmp_path, fetch_allow_hosts=[NAME], compute_allow_hosts={mine: ["127.0.0.1"]})
    with pytest.raises(TargetRefused, match="only through its name"), _tenant_driver(wide, port, tls, theirs_path):
        pass


@pytest.mark.usefixtures("every_node_proven")
def test_each_nodes_tasks_are_reached_at_that_nodes_address_if_the_gateway_may_route_there(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    """A tenant's swarm of many nodes: a task's address is its node's (the manager's: the one
    the worker checked) and the port the engine reported for it; a node whose address the
    gateway may not route to gives its tasks none, and the driver keeps new tasks off it."""
    port, handler = engine
    handler.hostile = _nodes(NODES, list(NODES), published=31000)
    allowed = [NAME, "127.0.0.1", "127.0.0.2", "10.213.0.7", "swarm.tenant.example"]
    context = _context(app_context, tmp_path, fetch_allow_hosts=allowed, service_subnet_pool="10.213.0.0/16")
    with _tenant_driver(context, port, tls) as driver:
        replicas, failure = driver.observe(replace(swarm_spec(), replicas=len(NODES)))
        constraints = driver._constraints()
    assert {r.id: r.address for r in replicas} == {
        "t-n1": "127.0.0.1:31000",
        "t-n2": "127.0.0.2:31000",
        "t-n3": None,
        "t-n4": None,
        "t-n5": "8.8.8.8:31000",
        "t-n6": None,
        "t-n7": None,
        "t-n8": None,
    }
    assert failure is None  # some route
    assert constraints == ["node.id!=n3", "node.id!=n4", "node.id!=n6", "node.id!=n7", "node.id!=n8"]

    # Only refused nodes' tasks: the pass says why at once (naming the node, not its address).
    handler.hostile = _nodes(NODES, ["n4"], published=31000)
    with _tenant_driver(context, port, tls) as driver:
        replicas, failure = driver.observe(swarm_spec())
    assert [r.address for r in replicas] == [None]
    assert failure is not None and "runs on node n4" in failure.reason and "10.0.0.9" not in failure.reason

    # A port-scoped entry for a node: its tasks on that port only, as for the manager.
    handler.hostile = _nodes(NODES, ["n2"], published=31000)
    scoped = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1", "127.0.0.2:31001"])
    with _tenant_driver(scoped, port, tls) as driver:
        replicas, failure = driver.observe(swarm_spec())
    assert [r.address for r in replicas] == [None]
    assert failure is not None and "publish port 31000 on node n2" in failure.reason


@pytest.mark.usefixtures("every_node_proven")
def test_a_swarm_with_more_refused_nodes_than_constraints_name_stays_on_the_manager(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    from workers.deploy.swarm import MAX_EXCLUDED_NODES

    port, handler = engine
    context = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1"])
    refused = {f"n{i}": "10.0.0.9" for i in range(2, MAX_EXCLUDED_NODES + 2)}
    for nodes, constraints in [
        (refused, [f"node.id!={node}" for node in refused]),
        ({**refused, "nmore": "10.0.0.9"}, ["node.id==n1"]),
        ({"n2": "10.0.0.9", "n3,node.role==manager": "10.0.0.9"}, ["node.id==n1"]),  # no swarm ID
        ({"n2": "8.8.8.8"}, []),
    ]:
        handler.hostile = _nodes({"n1": "10.9.9.9", **nodes}, [], published=31000)
        with _tenant_driver(context, port, tls) as driver:
            assert driver._constraints() == constraints


@pytest.mark.usefixtures("every_node_proven")
def test_a_node_whose_tasks_keep_being_rejected_fails_the_generation_naming_it_though_another_answered(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    """Node n2 cannot pull the image: swarm places a task there every few seconds, each
    rejected, while the manager's answers. Its rejections are counted on their own: the
    generation fails naming the node (swarm's own error with it)."""
    from workers.deploy.swarm import MAX_FAILED_TASKS

    port, handler = engine
    context = _context(app_context, tmp_path, fetch_allow_hosts=[NAME, "127.0.0.1", "127.0.0.2"])
    spec = replace(swarm_spec(), replicas=2)
    with tcp_listener(OK) as (replica_port, _):
        for rejected, failed in [
            (["n2"] * (MAX_FAILED_TASKS - 1), None),  # not yet
            (["n2"] * MAX_FAILED_TASKS, f"swarm could not run a replica on node n2 {MAX_FAILED_TASKS} times"),
            (["n1", "n2", "n2"], None),  # spread over nodes, and one answered
        ]:
            handler.hostile = _nodes({"n1": "10.9.9.9", "n2": "127.0.0.2"}, ["n1"], replica_port, rejected)
            with _tenant_driver(context, port, tls) as driver:
                replicas, failure = driver.observe(spec)
            assert [r.ready for r in replicas] == [True]  # the manager's answered
            if failed is None:
                assert failure is None
            else:
                assert failure is not None and failure.reason.startswith(failed), failure
                assert "No such image" in failure.reason

        # On the manager, as on one node: not named (the message as before); the service's log
        # read whole through the tenant engine's bound (docker-py's stream reader wants the
        # connection's socket, which that adapter does not hand out: the pass erred).
        listing = _nodes({"n1": "10.9.9.9"}, [], replica_port, ["n1"] * MAX_FAILED_TASKS).__func__  # type: ignore[attr-defined]
        line = b"Traceback: boom\n"
        framed = b"\x02\x00\x00\x00" + len(line).to_bytes(4, "big") + line
        handler.hostile = staticmethod(lambda path: (200, {}, framed) if path == "/services/s1/logs" else listing(path))
        with _tenant_driver(context, port, tls) as driver:
            _, failure = driver.observe(spec)
        assert failure is not None
        assert failure.reason.startswith(f"swarm could not run a replica {MAX_FAILED_TASKS} times before")
        assert failure.logs == "Traceback: boom"


# --- the TLS material's folder -----------------------------------------------------------


def test_the_unsealed_tls_material_lives_in_a_private_folder_of_the_worker_under_the_data_folder(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    port, _ = engine
    context = _context(app_context, tmp_path, fetch_allow_hosts=["127.0.0.1"])
    root = tmp_path / "data" / TLS_FOLDER
    with _swarm_driver_at(
        context, docker_host=f"tcp://127.0.0.1:{port}", tls=tls, installation="test", target="compute 'theirs'"
    ):
        (folder,) = root.iterdir()
        assert folder.name.startswith(f"mms-scratch-{_host()}-{os.getpid()}-swarm-tls-")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
        assert (folder / "key.pem").read_text() == tls["key"]
    assert list(root.iterdir()) == []


def test_a_killed_workers_tls_folder_is_removed_when_a_worker_starts_and_a_live_ones_kept(tmp_path: Path) -> None:
    """Workers may share the data folder: a folder is judged by its process, never its age."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    root = tmp_path / TLS_FOLDER
    left = root / f"mms-scratch-{_host()}-{ended.pid}-swarm-tls-abc"
    live = root / f"mms-scratch-{_host()}-{os.getppid()}-swarm-tls-def"  # another worker, running
    elsewhere = root / f"mms-scratch-another-host-{ended.pid}-swarm-tls-ghi"  # another machine's
    for folder in (left, live, elsewhere):
        folder.mkdir(parents=True)
        (folder / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    assert remove_orphaned_tls(tmp_path) == 1
    assert sorted(root.iterdir()) == sorted([live, elsewhere])
    assert remove_orphaned_tls(tmp_path / "none-yet") == 0


def test_a_worker_starting_removes_a_killed_workers_tls_folder(
    tmp_path: Path, app_context: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers import celery_app

    ended = subprocess.Popen(["true"])
    ended.wait()
    left = tmp_path / TLS_FOLDER / f"mms-scratch-{_host()}-{ended.pid}-swarm-tls-abc"
    left.mkdir(parents=True)
    monkeypatch.setattr(celery_app, "settings", app_context.settings.model_copy(update={"data_dir": tmp_path}))
    umask = os.umask(0o022)
    try:
        celery_app._private_files()  # what Celery's worker_init runs
    finally:
        os.umask(umask)
    assert not left.exists()


# --- the reconciler's passes -------------------------------------------------------------


@pytest.fixture()
def context(app_context: ServiceContext, tmp_path: Path) -> ServiceContext:
    """The workers' and the API's context: the operator allows the engine's loopback address."""
    return _context(app_context, tmp_path, fetch_allow_hosts=["127.0.0.1"])


@pytest.fixture()
def client(context: ServiceContext) -> Iterator[TestClient]:  # the API with that context (callers' too)
    yield TestClient(create_app(context=context), base_url="http://testserver")


@pytest.fixture()
def deployed(
    client: TestClient,
    callers: Callers,
    db: Session,
    context: ServiceContext,
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
) -> tuple[str, dict[str, str], uuid.UUID]:
    """A keyless service on the tenant's swarm at the engine; its URL, the owner's headers, its id."""
    owner = callers.headers()
    account = new_account(client, owner)
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    manifest_id = client.post(f"{account}/manifests", json=seed_manifest(model_id), headers=owner).json()["id"]
    image_id = built_image(client, db, account, owner, manifest_id)
    port, _ = engine
    body = {"type": "swarm", "properties": {"dockerHost": f"tcp://127.0.0.1:{port}", "tls": tls}}
    assert client.put(f"{account}/computes/theirs", json=body, headers=owner).status_code == 201
    config = {"numReplicas": 1, "authEnabled": False}
    body = {"name": "on-theirs", "imageId": image_id, "computeName": "theirs", "deploymentConfig": config}
    created = client.post(f"{account}/services", json=body, headers=owner)
    assert created.status_code == 202, created.text
    return f"{account}/services/{created.json()['id']}", owner, uuid.UUID(created.json()["id"])


def test_a_service_on_a_compute_allowed_a_private_manager_is_routed_there_and_no_other_compute_is(
    app_context: ServiceContext,
    callers: Callers,
    db: Session,
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    tmp_path: Path,
) -> None:
    """From the settings to the route, as a deploy runs: the attach, and the pass, which finds
    the compute's path from its rows (the operator lists nothing for the installation)."""
    owner = callers.headers()
    account = new_account(TestClient(create_app(context=app_context), base_url="http://testserver"), owner)
    path = f"{account.removeprefix('/api')}/computes/theirs"
    context = _context(app_context, tmp_path, compute_allow_hosts={path: ["127.0.0.1"]})
    client = TestClient(create_app(context=context), base_url="http://testserver")
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    manifest_id = client.post(f"{account}/manifests", json=seed_manifest(model_id), headers=owner).json()["id"]
    image_id = built_image(client, db, account, owner, manifest_id)
    port, handler = engine
    body = {"type": "swarm", "properties": {"dockerHost": f"tcp://127.0.0.1:{port}", "tls": tls}}
    assert client.put(f"{account}/computes/theirs", json=body, headers=owner).status_code == 201
    assert client.put(f"{account}/computes/mine", json=body, headers=owner).status_code == 400
    config = {"numReplicas": 1, "authEnabled": False}
    created = client.post(
        f"{account}/services",
        json={"name": "on-theirs", "imageId": image_id, "computeName": "theirs", "deploymentConfig": config},
        headers=owner,
    )
    assert created.status_code == 202, created.text
    service_id = uuid.UUID(created.json()["id"])
    with tcp_listener(OK) as (replica_port, _):
        _healthy(client, context, (f"{account}/services/{service_id}", owner, service_id), handler, replica_port)
        assert _routes(db, service_id) == [f"127.0.0.1:{replica_port}"]


def _routes(db: Session, service_id: uuid.UUID) -> list[str]:
    db.expire_all()
    return list(db.scalars(select(ServiceReplica.address).where(ServiceReplica.service_id == service_id)))


def _healthy(client: TestClient, context: ServiceContext, deployed, handler, published: int) -> None:  # type: ignore[no-untyped-def]
    url, owner, service_id = deployed
    labels = {SERVICE_LABEL: str(service_id), GENERATION_LABEL: "1", INSTALLATION_LABEL: installation_id(context)}
    handler.hostile = _running(labels, published)
    reconcile_service(context, service_id)
    shown = client.get(url, headers=owner).json()
    assert shown["state"] == "Healthy", shown


def test_a_tenant_swarm_away_or_unreadable_leaves_no_route_to_its_old_address(
    client: TestClient,
    context: ServiceContext,
    db: Session,
    deployed: tuple[str, dict[str, str], uuid.UUID],
    engine: tuple[int, type[_Engine]],  # noqa: F811
) -> None:
    """The route to a task's address outlives neither the tenant's engine nor a pass that could
    not read it: that host's port may serve someone else by the next pass."""
    url, owner, service_id = deployed
    _, handler = engine
    with tcp_listener(OK) as (replica_port, _):
        _healthy(client, context, deployed, handler, replica_port)
        assert _routes(db, service_id) == [f"127.0.0.1:{replica_port}"]

        # Away (here: it redirects every call, which the worker never follows).
        handler.hostile = staticmethod(lambda path: (307, {"Location": "http://127.0.0.1:9/"}, b""))
        reconcile_service(context, service_id)
        shown = client.get(url, headers=owner).json()
        assert shown["state"] == "Unhealthy" and "redirect" in shown["error"]["message"], shown
        assert _routes(db, service_id) == []

        # Back, then an answer the pass cannot read (a task with no id).
        _healthy(client, context, deployed, handler, replica_port)
        assert _routes(db, service_id) == [f"127.0.0.1:{replica_port}"]
        labels = {SERVICE_LABEL: str(service_id), GENERATION_LABEL: "1", INSTALLATION_LABEL: installation_id(context)}
        running = _running(labels, replica_port).__func__  # type: ignore[attr-defined]
        no_id = json.dumps([{"DesiredState": "running", "Status": _status(replica_port)}]).encode()
        handler.hostile = staticmethod(lambda path: (200, {}, no_id) if path == "/tasks" else running(path))
        reconcile_service(context, service_id)
        assert _routes(db, service_id) == []


def test_an_engines_error_text_reaches_the_log_cut_short(
    client: TestClient,
    context: ServiceContext,
    deployed: tuple[str, dict[str, str], uuid.UUID],
    engine: tuple[int, type[_Engine]],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An engine refusing a call says why in up to 64 KiB of its choosing; the operator's log
    gets a few hundred characters of it, with where the pass failed."""
    _, _, service_id = deployed
    _, handler = engine
    said = json.dumps({"message": "HOSTILE-" * 7000}).encode()  # 56 KB: under the bound of an error's
    handler.hostile = staticmethod(lambda path: (500, {}, said) if path == "/services" else None)
    caplog.set_level("DEBUG")
    reconcile_service(context, service_id)
    (failed,) = [r for r in caplog.records if r.getMessage() == "deploy.pass_failed"]
    assert "APIError" in failed.exception and "swarm.py" in failed.exception  # type: ignore[attr-defined]
    assert len(caplog.text) < 8000 and caplog.text.count("HOSTILE") < 100
    assert all(len(str(getattr(r, "exception", ""))) < 8000 for r in caplog.records)
    assert not any(r.exc_info for r in caplog.records if "HOSTILE" in str(r.exc_info))


@pytest.mark.parametrize("answer", ["hangs", "fails"])
def test_a_manager_name_that_does_not_resolve_in_time_is_unreachable_not_refused(
    tls: dict[str, str], app_context: ServiceContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """A resolver that does not answer ends the lookup at the fetcher's bound, well inside the
    pass's deadline; one that fails (EAI_AGAIN) ends it at once. Either leaves the service
    Unhealthy (tried again), not Failed: the name may resolve later, as a kubernetes server's."""
    import threading
    import time

    from workers import fetcher
    from workers.deploy.local import EngineUnreachable

    monkeypatch.setattr(fetcher, "RESOLVE_SECONDS", 0.3)
    release = threading.Event()

    def hanging(host: str, port: int, *args: object, **kwargs: object) -> list:
        if answer == "fails":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        release.wait(30)
        return _to_loopback(host, port)

    started = time.monotonic()
    try:
        with (
            pytest.raises(EngineUnreachable, match=r"did not resolve within 0\.3 s|cannot resolve host"),
            _swarm_driver_at(
                _context(app_context, tmp_path),
                docker_host=f"tcp://{NAME}:2376",
                tls=tls,
                installation="test",
                target="compute 'theirs'",
                resolver=hanging,
            ),
        ):
            pass
        assert time.monotonic() - started < 3
    finally:
        release.set()


def test_a_cleanup_reaches_an_address_allowed_for_its_compute_alone(
    engine: tuple[int, type[_Engine]],  # noqa: F811
    tls: dict[str, str],
    app_context: ServiceContext,
    tmp_path: Path,
) -> None:
    """A force delete's cleanup outlives the account and its computes: it finds the hosts the
    operator allows for the compute by the path the row kept, and a row that names no compute
    (from before it was kept) or another gets the installation's alone."""
    port, handler = engine
    asked: list[str] = []

    def nothing_there(path: str) -> Answer | None:
        asked.append(path)
        return (200, {}, b"[]") if path in ("/services", "/tasks", "/containers/json") else None

    handler.hostile = staticmethod(nothing_there)
    mine = "/subscriptions/sub-a/resourceGroups/rg/accounts/acct/computes/prod"
    context = _context(app_context, tmp_path, compute_allow_hosts={mine: [f"127.0.0.1:{port}"]})
    sealed = context.sealer.seal(json.dumps({"tls": tls}).encode())

    def cleanup(compute_path: str | None) -> Cleanup:
        return Cleanup(
            uuid.uuid4(), uuid.uuid4(), "swarm", "", f"tcp://127.0.0.1:{port}", sealed, 0, utcnow(), compute_path
        )

    cluster_cleanup._remove_from_swarm(context, cleanup(mine), "test")  # nothing of that service there: done
    assert "/services" in asked
    asked.clear()
    for other in (None, "/subscriptions/sub-b/resourceGroups/rg/accounts/acct/computes/prod"):
        with pytest.raises(TargetRefused, match="is refused"):
            cluster_cleanup._remove_from_swarm(context, cleanup(other), "test")
    assert asked == []  # never connected to
