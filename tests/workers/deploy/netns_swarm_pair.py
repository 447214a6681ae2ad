"""A tenant's two-node swarm for the tests: two dockerds, each in a network namespace of its own
(its own iptables), both on a bridge in a third namespace (the nodes' "LAN"), which the host
joins too by a veth of its own: host, manager and worker share one /29 and reach each other
without the host routing anything. The manager (node 1) runs `docker swarm init`, the worker
(node 2) `docker swarm join`s it as a worker. Each node listens with TLS on its address and
pulls images from the tests' registries through forwarders on its own loopback
(netns_swarm.py's).

Everything is torn down on the way out, also after a failure: the daemons and whatever runs in
the three namespaces, their mounts, the namespaces and the host's veth. The host's iptables
and the shared engine are never touched.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.workers.deploy.netns_swarm import (
    _certificates,
    _Forwarder,
    _free_slash30,
    _kill_the_rest,
    _run,
    _start_dockerd,
    _stop,
    _unmount_under,
    _wait_for,
)


@dataclass(frozen=True)
class SwarmNode:
    address: str  # on the LAN
    docker_host: str  # tcp://address:2376, TLS
    tls: dict[str, str]  # ca, cert, key: PEM (each node's CA its own, or the manager's: shared_ca)
    api: docker.APIClient  # the test's own view (its unix socket)
    netns: str


@dataclass(frozen=True)
class TwoNodeSwarm:
    manager: SwarmNode
    worker: SwarmNode
    host_address: str  # the host's own on the LAN
    lan: str  # the namespace holding the bridge
    host_link: str  # the host's end of its veth to the LAN
    root: Path  # the daemons' folders: n1 (the manager's), n2

    @property
    def names(self) -> list[str]:
        """The namespaces and the host link it made (gone after it)."""
        return [self.lan, self.manager.netns, self.worker.netns, self.host_link]

    @property
    def nodes(self) -> tuple[SwarmNode, SwarmNode]:
        return self.manager, self.worker


@contextlib.contextmanager
def two_node_swarm(
    *, registry_ports: Sequence[int], seconds: float = 60, shared_ca: bool = False
) -> Iterator[TwoNodeSwarm]:
    """``shared_ca``: the worker node's certificates from the manager's CA (one tenant's nodes,
    each provable with its TLS material); else each node has a CA of its own."""
    tag = secrets.token_hex(3)
    lan, host_side, lan_host_side = f"mmsl{tag}", f"mlh{tag}", f"mll{tag}"
    prefix = _free_slash30()
    host_ip = f"{prefix}.1"
    names = [(f"mmsn{i}{tag}", f"mln{i}{tag}", f"mnn{i}{tag}", f"{prefix}.{i + 2}") for i in range(2)]
    # Short, not under pytest's tmp_path: containerd's sockets there take at most 104 characters.
    root = Path(tempfile.mkdtemp(prefix=f"sw2{tag}-"))
    daemons: list[subprocess.Popen] = []
    forwarders: list[_Forwarder] = []
    apis: list[docker.APIClient] = []
    try:
        _run("ip", "netns", "add", lan)
        _in(lan, "ip", "link", "add", "br0", "type", "bridge")
        _in(lan, "ip", "link", "set", "br0", "up")
        _in(lan, "ip", "link", "set", "lo", "up")
        _run("ip", "link", "add", host_side, "type", "veth", "peer", "name", lan_host_side)
        _run("ip", "link", "set", lan_host_side, "netns", lan)
        _run("ip", "addr", "add", f"{host_ip}/29", "dev", host_side)
        _run("ip", "link", "set", host_side, "up")
        _in(lan, "ip", "link", "set", lan_host_side, "master", "br0", "up")
        nodes: list[SwarmNode] = []
        for netns, lan_side, ns_side, address in names:
            _run("ip", "netns", "add", netns)
            _run("ip", "link", "add", lan_side, "type", "veth", "peer", "name", ns_side)
            _run("ip", "link", "set", lan_side, "netns", lan)
            _run("ip", "link", "set", ns_side, "netns", netns)
            _in(lan, "ip", "link", "set", lan_side, "master", "br0", "up")
            _in(netns, "ip", "addr", "add", f"{address}/29", "dev", ns_side)
            _in(netns, "ip", "link", "set", ns_side, "up")
            _in(netns, "ip", "link", "set", "lo", "up")
            node_root = root / f"n{len(nodes) + 1}"
            node_root.mkdir()
            tls = _certificates(node_root, address, ca_from=root / "n1" if shared_ca and nodes else None)
            daemons.append(_start_dockerd(node_root, netns, address))
            sock = _wait_for(daemons[-1], node_root, seconds)
            apis.append(docker.APIClient(base_url=f"unix://{sock}", version="auto", timeout=30))
            forwarders.extend(_Forwarder(netns, port) for port in registry_ports)
            nodes.append(SwarmNode(address, f"tcp://{address}:2376", tls, apis[-1], netns))
        manager, worker = nodes
        manager.api.init_swarm(advertise_addr=manager.address, listen_addr=f"{manager.address}:2377")
        token = manager.api.inspect_swarm()["JoinTokens"]["Worker"]
        worker.api.join_swarm(
            [f"{manager.address}:2377"],
            token,
            listen_addr=f"{worker.address}:2377",
            advertise_addr=worker.address,
        )
        yield TwoNodeSwarm(manager, worker, host_ip, lan, host_side, root)
    finally:
        for forwarder in forwarders:
            forwarder.stop()
        for api in apis:
            api.close()
        for dockerd in reversed(daemons):  # the worker first: the manager sees it go
            _stop(dockerd)
        for netns in [n for n, *_ in names] + [lan]:
            _kill_the_rest(netns)
        _unmount_under(root)
        for netns in [n for n, *_ in names] + [lan]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        # Links go with their namespace; one still on the host (a failed move) goes here.
        for link in [host_side, lan_host_side] + [n[1] for n in names]:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _in(netns: str, *command: str) -> None:
    _run("ip", "netns", "exec", netns, *command)


def still_there(names: Sequence[str]) -> list[str]:
    """Which of these network namespaces and host links exist."""
    found = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout.split()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    found += [line.split(":")[1].strip().split("@")[0] for line in links]
    return [name for name in names if name in found]
