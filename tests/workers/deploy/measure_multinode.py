"""The measurements behind docs/design/web-services.md, "Multi-node swarm (measured,
2026-12-04)", on the two-node swarm of netns_swarm_pair.py. Not a test (pytest does not collect
the file); it prints what it finds. Run it by path:

    .venv/bin/python -m pytest tests/workers/deploy/measure_multinode.py -s -p no:cacheprovider
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time

import docker
import httpx

from tests.infra import Infra
from tests.workers.deploy.netns_swarm_pair import SwarmNode, TwoNodeSwarm, still_there, two_node_swarm

HOST_PORT = 18977  # a host service listening on every address, for the probes
HTTP = ["python3", "-m", "http.server", "5001"]
HOST_MODE = [{"Protocol": "tcp", "TargetPort": 5001, "PublishMode": "host"}]
# Each argument kind:target; prints {argument: result}.
PROBE = r"""
import json, socket, sys, urllib.request
out = {}
for target in sys.argv[1:]:
    kind, _, rest = target.partition(":")
    try:
        if kind == "http":
            out[target] = urllib.request.urlopen("http://" + rest, timeout=3).status
        elif kind == "dns":
            out[target] = sorted({a[4][0] for a in socket.getaddrinfo(rest, 80)})
        else:
            host, _, port = rest.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=3):
                out[target] = "connected"
    except Exception as exc:
        out[target] = type(exc).__name__ + " " + str(exc)[:80]
print(json.dumps(out))
"""


def test_measure(infra: Infra) -> None:
    image = _pushed(infra, infra.auth_registry, "multinode", auth=True)
    ports = [int(r.rpartition(":")[2]) for r in (infra.registry, infra.auth_registry)]
    listener = _host_listener()
    started = time.monotonic()
    with two_node_swarm(registry_ports=ports) as swarm:
        print(f"\nup in {time.monotonic() - started:.1f} s")
        m, w = swarm.nodes
        for node in m.api.nodes():
            print("node", node["Spec"]["Role"], node["Status"], node.get("ManagerStatus"))
        ids = {n["Status"]["Addr"]: n["ID"] for n in m.api.nodes()}
        node1, node2 = ids[m.address], ids[w.address]
        for netns in (m.netns, w.netns):
            print("listening", netns, _listening(netns))

        # Pulls on node 2 by digest: without, then with the registry's credentials.
        for auth in (False, True):
            credentials = {**infra.basic_auth(), "serveraddress": infra.auth_registry} if auth else None
            t0 = time.monotonic()
            service = _service(m, f"pull-{auth}", image, ["sleep", "600"], node=node2, auth=credentials)
            tasks = _running(m, service, 1, seconds=60 if auth else 20)
            print("pull", "auth" if auth else "no auth", f"{time.monotonic() - t0:.1f} s", _states(tasks))
            m.api.remove_service(service)

        image = _pushed(infra, infra.registry, "multinode-open", auth=False)  # the rest: no credentials
        for internal in (False, True):
            _overlays(swarm, image, internal, node1, node2)

        # Host mode on a task whose only network is an internal overlay.
        m.api.create_network("ovi2", driver="overlay", attachable=True, internal=True)
        service = _service(m, "ovi2-s", image, HTTP, node=node2, network="ovi2", ports=HOST_MODE)
        (task,) = _running(m, service, 1)
        print("internal-only host mode: port status", task["Status"].get("PortStatus"))
        m.api.remove_service(service)
        _remove_network(m, "ovi2")

        for label, mode, placement in (
            ("2 replicas", 2, {}),
            ("4 replicas", 4, {}),
            ("max 1 per node, 3 replicas", 3, {"MaxReplicas": 1}),
            ("spread node.id, 4 replicas", 4, {"Preferences": [{"Spread": {"SpreadDescriptor": "node.id"}}]}),
        ):
            service = _service(m, "place", image, ["sleep", "600"], replicas=mode, placement=placement)
            time.sleep(8)
            tasks = m.api.tasks(filters={"service": service, "desired-state": "running"})
            where: dict[str, int] = {}
            for t in tasks:
                key = {node1: "n1", node2: "n2"}.get(t.get("NodeID", ""), "none") + ":" + t["Status"]["State"]
                where[key] = where.get(key, 0) + 1
            print("placement", label, where, {t["Status"].get("Err") for t in tasks} - {None})
            m.api.remove_service(service)
            time.sleep(2)
    listener.close()
    print("left behind", still_there(swarm.names))


def test_measure_gwbridge(infra: Infra) -> None:
    """Two tasks on node 2, each on an overlay of its own (not internal)."""
    image = _pushed(infra, infra.registry, "multinode-gw", auth=False)
    with two_node_swarm(registry_ports=[int(infra.registry.rpartition(":")[2])]) as swarm:
        m, w = swarm.nodes
        node2 = next(n["ID"] for n in m.api.nodes() if n["Status"]["Addr"] == w.address)
        tasks = {}
        for name in ("gwa", "gwb"):
            m.api.create_network(name, driver="overlay", attachable=True)
            tasks[name] = _running(m, _service(m, f"{name}-s", image, HTTP, node=node2, network=name), 1)[0]
        gw = w.api.inspect_network("docker_gwbridge")
        print("\ndocker_gwbridge", gw["Options"], {c["Name"]: c["IPv4Address"] for c in gw["Containers"].values()})
        a, b = (_container(tasks[n]) for n in ("gwa", "gwb"))
        b_overlay = _overlay_ip(tasks["gwb"])
        b_gw = gw["Containers"][b]["IPv4Address"].split("/")[0]
        print("a -> b", _probe(w, a, f"http:{b_overlay}:5001/", f"http:{b_gw}:5001/"))
        print("ip_forward in a task", w.api.exec_start(w.api.exec_create(a, ["cat", "/proc/sys/net/ipv4/ip_forward"])))
        print("ip_forward on node 2", _in(w.netns, "cat", "/proc/sys/net/ipv4/ip_forward"))


def test_measure_config_only(infra: Infra) -> None:
    """Today's ``swarm`` network (a swarm-scoped bridge from a config-only network made through
    one node's engine) with a second node: where 2 replicas go."""
    image = _pushed(infra, infra.registry, "multinode-cfg", auth=False)
    with two_node_swarm(registry_ports=[int(infra.registry.rpartition(":")[2])]) as swarm:
        m, w = swarm.nodes
        config = {
            "Name": "cfgo",
            "ConfigOnly": True,
            "Driver": "bridge",
            "IPAM": {"Config": [{"Subnet": "10.213.9.0/27"}]},
            "Options": {"com.docker.network.bridge.name": "mmscfg0"},
        }
        m.api._post_json(m.api._url("/networks/create"), data=config).raise_for_status()
        bridge = {"Name": "swb", "Driver": "bridge", "Scope": "swarm", "ConfigFrom": {"Network": "cfgo"}}
        m.api._post_json(m.api._url("/networks/create"), data=bridge).raise_for_status()
        service = _service(m, "cfgsvc", image, HTTP, network="swb", replicas=2)
        time.sleep(20)
        node2 = next(n["ID"] for n in m.api.nodes() if n["Status"]["Addr"] == w.address)
        for t in m.api.tasks(filters={"service": service}):
            where = "n2" if t.get("NodeID") == node2 else "n1"
            print("task", where, t["DesiredState"], t["Status"]["State"], t["Status"].get("Err"))
        m.api.remove_service(service)


def _overlays(swarm: TwoNodeSwarm, image: str, internal: bool, node1: str, node2: str) -> None:
    """A task on each node on one overlay: task to task, VIP, DNS, and what node 2's task reaches."""
    m, w = swarm.nodes
    name = "ovi" if internal else "ovp"
    m.api.create_network(name, driver="overlay", attachable=True, internal=internal)
    ports = None if internal else HOST_MODE
    one = _service(m, f"{name}-1", image, HTTP, node=node1, network=name, ports=ports, mode="dnsrr")
    two = _service(m, f"{name}-2", image, HTTP, node=node2, network=name, ports=ports, mode="vip")
    t1, t2 = _running(m, one, 1)[0], _running(m, two, 1)[0]
    ip1, ip2 = _overlay_ip(t1), _overlay_ip(t2)
    vips = [v["Addr"].split("/")[0] for v in m.api.inspect_service(two)["Endpoint"].get("VirtualIPs", [])]
    c1, c2 = _container(t1), _container(t2)
    targets = [f"http:{ip2}:5001/", f"dns:tasks.{name}-2", f"dns:{name}-2", *(f"http:{v}:5001/" for v in vips)]
    print(name, "node 1 task -> node 2", _probe(m, c1, *targets))
    print(name, "node 2 task -> node 1", _probe(w, c2, f"http:{ip1}:5001/"))
    outside = [
        *(f"tcp:{m.address}:{p}" for p in (2376, 2377, 7946)),
        *(f"tcp:{w.address}:{p}" for p in (2376, 2377)),
        f"tcp:{swarm.host_address}:{HOST_PORT}",
        f"tcp:{swarm.host_address}:5000",
        "tcp:169.254.169.254:80",
        "tcp:1.1.1.1:443",
    ]
    print(name, "from node 2's task", _probe(w, c2, *outside))
    if not internal:
        for task, node in ((t1, m), (t2, w)):
            port = task["Status"]["PortStatus"]["Ports"][0]["PublishedPort"]
            print(
                name, "host ->", node.address, port, httpx.get(f"http://{node.address}:{port}/", timeout=5).status_code
            )
        port2 = t2["Status"]["PortStatus"]["Ports"][0]["PublishedPort"]
        print(name, "node 1 task -> node 2's published port", _probe(m, c1, f"http:{w.address}:{port2}/"))
    for service in (one, two):
        m.api.remove_service(service)
    _remove_network(m, name)


def _pushed(infra: Infra, registry: str, name: str, *, auth: bool) -> str:
    """The base image (python3) pushed to ``registry``: its reference by digest."""
    reference = f"{registry}/{infra.prefix}/{name}"
    with infra.api() as api:
        api.tag(infra.base_image, reference, "py3.11")
        config = infra.basic_auth() if auth else None
        chunks = list(api.push(reference, tag="py3.11", stream=True, decode=True, auth_config=config))
        digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c)
        api.remove_image(f"{reference}:py3.11")
    infra.pushed.append((registry, f"{infra.prefix}/{name}", digest))
    return f"{reference}@{digest}"


def _service(
    manager: SwarmNode,
    name: str,
    image: str,
    command: list[str],
    *,
    node: str | None = None,
    network: str | None = None,
    ports: list | None = None,
    mode: str = "dnsrr",
    replicas: int = 1,
    placement: dict | None = None,
    auth: dict | None = None,
) -> str:
    template: dict = {"ContainerSpec": {"Image": image, "Command": command}, "Placement": dict(placement or {})}
    if node:
        template["Placement"]["Constraints"] = [f"node.id=={node}"]
    if network:
        template["Networks"] = [{"Target": network}]
    body = {
        "Name": name,
        "TaskTemplate": template,
        "Mode": {"Replicated": {"Replicas": replicas}},
        "EndpointSpec": {"Mode": mode, **({"Ports": ports} if ports else {})},
    }
    headers = {"X-Registry-Auth": docker.auth.encode_header(auth)} if auth else {}  # --with-registry-auth
    url = manager.api._url("/services/create")
    return manager.api._result(manager.api._post_json(url, data=body, headers=headers), json=True)["ID"]


def _running(manager: SwarmNode, service: str, count: int, seconds: float = 90) -> list[dict]:
    """Its running tasks once ``count`` run; else, past ``seconds``, all its tasks (some rejected)."""
    deadline = time.monotonic() + seconds
    while True:
        tasks = manager.api.tasks(filters={"service": service})
        # Running, with its container named (the manager's view can lag the node's a moment).
        running = [t for t in tasks if t["Status"]["State"] == "running" and _container(t)]
        if len(running) >= count:
            return running
        assert time.monotonic() < deadline or "rejected" in {t["Status"]["State"] for t in tasks}, _states(tasks)
        if time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def _states(tasks: list[dict]) -> list[tuple]:
    return [(t["Status"]["State"], t["Status"].get("Err")) for t in tasks][:3]


def _container(task: dict) -> str:
    return (task["Status"].get("ContainerStatus") or {}).get("ContainerID") or ""


def _overlay_ip(task: dict) -> str:
    return task["NetworksAttachments"][0]["Addresses"][0].split("/")[0]


def _probe(node: SwarmNode, container: str, *targets: str) -> dict:
    made = node.api.exec_create(container, ["python3", "-c", PROBE, *targets])
    return json.loads(node.api.exec_start(made).decode().strip().splitlines()[-1])


def _in(netns: str, *command: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, *command], capture_output=True, text=True, check=True).stdout


def _listening(netns: str) -> dict[str, list[str]]:
    """TCP and UDP sockets listening in the namespace: address:port."""
    found = {}
    for proto, state in (("tcp", "0A"), ("udp", "07")):
        rows = [r.split() for r in _in(netns, "cat", f"/proc/net/{proto}").splitlines()[1:]]
        found[proto] = sorted({_address(r[1]) for r in rows if r[3] == state})
    return found


def _address(hexed: str) -> str:
    ip, port = hexed.split(":")
    return f"{socket.inet_ntoa(int(ip, 16).to_bytes(4, 'little'))}:{int(port, 16)}"


def _host_listener() -> socket.socket:
    listener = socket.create_server(("0.0.0.0", HOST_PORT))  # every address: the probes target one
    listener.settimeout(0.5)

    def serve() -> None:
        while listener.fileno() != -1:
            with contextlib.suppress(OSError):
                listener.accept()[0].close()

    threading.Thread(target=serve, daemon=True).start()
    return listener


def _remove_network(manager: SwarmNode, network: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            manager.api.remove_network(network)
            return
        except docker.errors.APIError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
