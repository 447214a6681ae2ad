"""A web-service replica on the local engine reaches nothing but what the host asks of it.

Real engine (scripts/infra), real host firewall (scripts/infra/service-network.sh, which
docker-engine.sh applies; the tests never remove it: other sessions share it). Two services,
each on its own network from ``ensure_service_network``; service A runs two replicas, B one,
each with ``replica_host_config`` as the local driver runs them (``python3 -m http.server`` on
the replica port, image user 10002 with ``HOME`` set, as the builders make it). Probes run
inside a replica (``docker exec`` of the image's ``python3 -I -S``, connect() with a short
timeout) and assert docs/design/web-services.md's probe table.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import docker
import httpx
import pytest
from pydantic import ValidationError

from app.config import Settings
from tests.infra import TEST_LABEL, Infra
from tests.listeners import tcp_listener
from workers.containment import REPLICA_PORT, replica_host_config
from workers.deploy import local_network
from workers.deploy.local_network import (
    ServiceNetwork,
    ServiceNetworkError,
    ensure_service_network,
    remove_service_network,
    require_service_firewall,
    service_networks,
)

POOL = "10.213.0.0/16"  # MMS_SERVICE_SUBNET_POOL's default
TMP_MB = 8
# Runs in a replica: connect() to each host:port argument at once, 2 s each; prints
# {target: "connected" | "refused" | "timeout" | errno name}.
PROBE = """\
import errno, json, socket, sys, threading
out = {}
def probe(target):
    host, port = target.rsplit(":", 1)
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, int(port)))
        out[target] = "connected"
    except socket.timeout:
        out[target] = "timeout"
    except ConnectionRefusedError:
        out[target] = "refused"
    except OSError as e:
        out[target] = errno.errorcode.get(e.errno, str(e))
    finally:
        s.close()
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(out))
"""
# Runs in a replica: what it may write, and what not. argv: a size in MB that fits /tmp
# twice but not three times.
WRITES = """\
import json, os, sys
out = {}
def write(path, mb=0):
    try:
        with open(path, "wb") as f:
            f.write(b"x" * (mb << 20) or b"x")
        return "written"
    except OSError as e:
        return e.__class__.__name__ + ": " + (e.strerror or "")
home = os.environ["HOME"]
for path in ("/probe", "/etc/probe", "/var/azureml-app/probe", "/tmp/probe", home + "/probe", "/data/probe"):
    out[path] = write(path)
out["tmp-fill"] = [write(f"/tmp/fill{i}", int(sys.argv[1])) for i in range(3)]
out["home"] = os.environ["HOME"]
out["uid"] = os.getuid()
out["engine-socket"] = os.path.exists("/var/run/docker.sock")
print(json.dumps(out))
"""


@dataclass
class Replica:
    id: str
    address: str


@dataclass
class Deployed:
    api: docker.APIClient
    a: ServiceNetwork
    b: ServiceNetwork
    a1: Replica
    a2: Replica
    b1: Replica


@pytest.fixture(scope="module")
def image(infra: Infra) -> Iterator[str]:
    """The published base as the builders leave an image: user 10002, HOME set, and a VOLUME
    (which must become a tmpfs, not an anonymous volume)."""
    tag = f"{infra.prefix}-svcnet:1"
    dockerfile = f"FROM {infra.base_image}\nUSER 10002:10002\nENV HOME=/home/scoring\nVOLUME /data\n"
    with infra.api() as api:
        chunks = list(
            api.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, network_mode="none", decode=True)
        )
        infra.local_images.append(tag)
        assert not [c for c in chunks if "error" in c], chunks
    yield tag


@pytest.fixture(scope="module")
def deployed(infra: Infra, image: str) -> Iterator[Deployed]:
    services = [uuid.uuid4(), uuid.uuid4()]
    with infra.api() as api:
        containers: list[str] = []
        try:
            a, b = (ensure_service_network(api, service, POOL) for service in services)
            a1, a2 = (_start(api, image, a, services[0], containers) for _ in range(2))
            b1 = _start(api, image, b, services[1], containers)
            for replica in (a1, a2, b1):
                _wait_until_serving(replica)
            yield Deployed(api=api, a=a, b=b, a1=a1, a2=a2, b1=b1)
        finally:
            for cid in containers:
                api.remove_container(cid, force=True, v=True)
            for service in services:
                remove_service_network(api, service)


def _start(
    api: docker.APIClient, image: str, network: ServiceNetwork, service: uuid.UUID, started: list[str]
) -> Replica:
    host_config = replica_host_config(
        api, image=image, network=network.name, cpus=1.0, memory_mb=128, pids=64, tmp_mb=TMP_MB
    )
    cid = api.create_container(
        image,
        command=["python3", "-m", "http.server", str(REPLICA_PORT), "--bind", "0.0.0.0"],
        working_dir="/tmp",
        environment={"PORT": str(REPLICA_PORT)},
        hostname="localhost",
        host_config=host_config,
        labels={TEST_LABEL: "svcnet", local_network.SERVICE_LABEL: str(service)},
    )["Id"]
    started.append(cid)
    api.start(cid)
    address = api.inspect_container(cid)["NetworkSettings"]["Networks"][network.name]["IPAddress"]
    return Replica(id=cid, address=address)


def _wait_until_serving(replica: Replica) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://{replica.address}:{REPLICA_PORT}/", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"replica {replica.id[:12]} never served GET /"
        time.sleep(0.2)


def _run(api: docker.APIClient, replica: Replica, code: str, *args: str) -> dict:
    exec_id = api.exec_create(replica.id, ["python3", "-I", "-S", "-c", code, *args])["Id"]
    output = api.exec_start(exec_id).decode()
    assert api.exec_inspect(exec_id)["ExitCode"] == 0, output
    return json.loads(output.strip().splitlines()[-1])


def _probe(deployed: Deployed, replica: Replica, *targets: str) -> dict[str, str]:
    return _run(deployed.api, replica, PROBE, *targets)


def test_the_host_reaches_each_replica(deployed: Deployed) -> None:
    for replica in (deployed.a1, deployed.a2, deployed.b1):
        assert httpx.get(f"http://{replica.address}:{REPLICA_PORT}/", timeout=5).status_code == 200


def test_a_replica_reaches_no_service_of_the_host(deployed: Deployed, infra: Infra) -> None:
    proxy = urlsplit(infra.build_proxy or "http://172.30.213.1:3128")
    registry_port = infra.registry.rsplit(":", 1)[1]
    gateway = deployed.a.gateway
    with tcp_listener() as (port, seen):  # any host service on 0.0.0.0
        found = _probe(
            deployed,
            deployed.a1,
            f"{gateway}:{port}",
            f"{proxy.hostname}:{proxy.port}",  # the build proxy: another interface of the host
            f"{gateway}:{registry_port}",
            f"{gateway}:5432",  # PostgreSQL, Redis, the engine's TCP port (compose)
            f"{gateway}:6379",
            f"{gateway}:2375",
            "127.0.0.1:5432",  # the replica's own loopback
        )
    assert found == {
        f"{gateway}:{port}": "refused",
        f"{proxy.hostname}:{proxy.port}": "refused",
        f"{gateway}:{registry_port}": "refused",
        f"{gateway}:5432": "refused",
        f"{gateway}:6379": "refused",
        f"{gateway}:2375": "refused",
        "127.0.0.1:5432": "refused",
    }
    assert not seen


def test_a_replica_reaches_no_other_replica_nor_the_metadata_address(deployed: Deployed) -> None:
    other_service = f"{deployed.b1.address}:{REPLICA_PORT}"
    same_service = f"{deployed.a2.address}:{REPLICA_PORT}"
    found = _probe(deployed, deployed.a1, other_service, same_service, "169.254.169.254:80", "1.1.1.1:443")
    # Not routed (ip_forward=0): dropped, so it times out.
    assert found[other_service] != "connected", found
    assert found["169.254.169.254:80"] != "connected", found
    assert found["1.1.1.1:443"] != "connected", found
    # Bridged, and rejected in FORWARD (br_netfilter's call-iptables).
    assert found[same_service] == "refused", found
    # And the other way round.
    back = f"{deployed.a1.address}:{REPLICA_PORT}"
    assert _probe(deployed, deployed.b1, back)[back] != "connected"


def test_a_replica_writes_only_to_its_memory_backed_folders(deployed: Deployed) -> None:
    found = _run(deployed.api, deployed.a1, WRITES, str(TMP_MB // 2 - 1))
    assert found["uid"] == 10002  # the image's own user, kept
    assert found["home"] == "/home/scoring"
    erofs = "OSError: Read-only file system"
    assert found["/probe"] == erofs
    assert found["/etc/probe"] == erofs
    assert found["/var/azureml-app/probe"].startswith(("OSError: Read-only", "FileNotFoundError"))
    assert found["/tmp/probe"] == "written"
    assert found["/home/scoring/probe"] == "written"
    assert found["/data/probe"] == "written"  # the image's VOLUME: a tmpfs
    assert found["tmp-fill"][:2] == ["written", "written"]
    assert found["tmp-fill"][2] == "OSError: No space left on device"
    assert found["engine-socket"] is False

    info = deployed.api.inspect_container(deployed.a1.id)
    host = info["HostConfig"]
    assert not [m for m in info["Mounts"] if m.get("Type") == "volume"]  # no anonymous volume
    assert host["ReadonlyRootfs"] is True
    assert set(host["Tmpfs"]) == {"/tmp", "/home/scoring", "/data"}
    assert "uid=10002" in host["Tmpfs"]["/home/scoring"] and f"size={TMP_MB}m" in host["Tmpfs"]["/home/scoring"]
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["PortBindings"] in (None, {}) and not info["NetworkSettings"]["Ports"]
    assert host["Memory"] == host["MemorySwap"] == 128 << 20
    assert host["PidsLimit"] == 64 and host["Init"] is True
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "2", "max-size": "10m"}}
    assert {u["Name"]: u["Hard"] for u in host["Ulimits"]} == {"fsize": TMP_MB << 20}


def test_a_root_images_home_is_root(infra: Infra) -> None:
    with infra.api() as api:
        tmpfs = replica_host_config(
            api, image=infra.base_image, network="none", cpus=64, memory_mb=64, pids=32, tmp_mb=16
        )
        assert set(tmpfs["Tmpfs"]) == {"/tmp", "/root"}
        assert "uid=0," in tmpfs["Tmpfs"]["/root"]
        assert tmpfs["NanoCpus"] == api.info()["NCPU"] * 10**9  # capped at the engine's CPUs


def test_networks_are_idempotent_distinct_and_removed(deployed: Deployed) -> None:
    api = deployed.api
    assert deployed.a != deployed.b
    for network in (deployed.a, deployed.b):
        assert network.subnet.endswith("/27") and network.bridge.startswith("mmss")
    assert deployed.a.subnet != deployed.b.subnet
    service = uuid.uuid4()
    try:
        first = ensure_service_network(api, service, POOL)
        assert ensure_service_network(api, service, POOL) == first
        assert first.name == f"mms-svc-{service.hex}" and first.bridge == f"mmss{service.hex[:10]}"
        assert first.subnet not in (deployed.a.subnet, deployed.b.subnet)
        info = api.inspect_network(first.name)
        assert info["Internal"] is True and info["EnableIPv6"] is False
        assert service_networks(api)[service] == first.name
    finally:
        remove_service_network(api, service)
    remove_service_network(api, service)  # idempotent
    assert service not in service_networks(api)
    assert not api.networks(filters={"label": f"{local_network.SERVICE_LABEL}={service}"})


def test_a_full_pool_is_an_error_naming_the_setting(infra: Infra) -> None:
    pool = "10.214.255.224/27"  # one slot, outside the default pool
    services = [uuid.uuid4(), uuid.uuid4()]
    with infra.api() as api:
        try:
            assert ensure_service_network(api, services[0], pool).subnet == pool
            with pytest.raises(ServiceNetworkError, match="MMS_SERVICE_SUBNET_POOL"):
                ensure_service_network(api, services[1], pool)
        finally:
            for service in services:
                remove_service_network(api, service)


def test_the_firewall_is_in_place_and_required(infra: Infra, monkeypatch: pytest.MonkeyPatch) -> None:
    # docker-engine.sh (the infra fixture ran it) applied service-network.sh --firewall.
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout.splitlines()
    for rule in (
        "-A INPUT -i mmss+ -j MMS-SVC-IN",
        "-A FORWARD -i mmss+ -j MMS-SVC-FWD",
        "-A FORWARD -o mmss+ -j MMS-SVC-FWD",
        "-A MMS-SVC-IN -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A MMS-SVC-IN -p tcp -j REJECT --reject-with tcp-reset",
        "-A MMS-SVC-IN -j REJECT --reject-with icmp-admin-prohibited",
        "-A MMS-SVC-FWD -p tcp -j REJECT --reject-with tcp-reset",
    ):
        assert rule in rules
    rules6 = subprocess.run(["ip6tables", "-S"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert "-A INPUT -i mmss+ -j DROP" in rules6
    monkeypatch.setattr(local_network, "_firewall_checked_at", None)
    require_service_firewall()
    # A missing jump (here: one the script never adds) fails the check, naming the script.
    monkeypatch.setattr(local_network, "_firewall_checked_at", None)
    monkeypatch.setattr(local_network, "_FIREWALL_RULES", (("INPUT", "-i", "mmss+", "-j", "MMS-SVC-MISSING"),))
    with pytest.raises(ServiceNetworkError, match=r"scripts/infra/service-network\.sh --firewall"):
        require_service_firewall()


@pytest.mark.parametrize("pool", ["10.213.0.1/16", "10.0.0.0/8", "10.213.0.0/25", "fd00::/64", "services"])
def test_the_subnet_pool_setting_is_an_ipv4_range_of_16_to_24(pool: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMS_SERVICE_SUBNET_POOL", pool)
    with pytest.raises(ValidationError, match="MMS_SERVICE_SUBNET_POOL"):
        Settings()
    monkeypatch.setenv("MMS_SERVICE_SUBNET_POOL", "10.40.0.0/24")
    assert Settings().service_subnet_pool == "10.40.0.0/24"


SERVICE_NETWORK_SCRIPT = "scripts/infra/service-network.sh"


def test_an_attested_firewall_is_trusted_only_while_the_attestation_is_fresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compose stack's deploy worker is neither root nor in the engine's network namespace:
    it trusts the file the engine's container rewrites with service-network.sh --attest."""
    attestation = tmp_path / "service-firewall"
    monkeypatch.setattr(local_network, "_firewall_checked_at", None)
    with pytest.raises(ServiceNetworkError, match=r"not attested .*service-network\.sh --attest"):
        require_service_firewall(attestation)
    attestation.write_text("firewall: in place\n")
    require_service_firewall(attestation)
    for age in (local_network.ATTESTATION_MAX_AGE_SECONDS + 5, -60):  # stale, or from the future
        monkeypatch.setattr(local_network, "_firewall_checked_at", None)
        stamp = time.time() - age
        os.utime(attestation, (stamp, stamp))
        with pytest.raises(ServiceNetworkError, match="last attested"):
            require_service_firewall(attestation)


def test_the_script_attests_only_a_firewall_in_place(tmp_path: Path, infra: Infra) -> None:
    """--attest writes the file where the rules pass (this host: docker-engine.sh applied them)
    and removes it where they do not (a fresh network namespace has no rules at all)."""
    attestation = tmp_path / "service-firewall"
    done = subprocess.run([SERVICE_NETWORK_SCRIPT, "--attest", str(attestation)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "firewall: in place" in attestation.read_text()
    done = subprocess.run(
        ["unshare", "--net", SERVICE_NETWORK_SCRIPT, "--attest", str(attestation)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "firewall: missing" in done.stderr
    assert not attestation.exists()
