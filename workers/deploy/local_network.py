"""Each web service's own network on the workers' engine (the ``local`` target).

One ``--internal`` bridge network per service, bridge ``mmss<10 hex of its id>``, on a /27 of
MMS_SERVICE_SUBNET_POOL (29 addresses: a generation and its successor while a rolling update
runs). The engine runs without iptables or forwarding and the host does not forward, so a
replica can address only its bridge and the host; scripts/infra/service-network.sh's host
firewall, which matches every ``mmss+`` interface, rejects all a replica sends the host but
the replies to connections the host opened, and all traffic between replicas. Without it a
replica reached every host service on 0.0.0.0 (docs/design/web-services.md, "Measured"), so
nothing is deployed while it is missing: ``require_service_firewall`` fails closed.

The engine is the ledger: a service's network is found by its name and label, the slots in
use are read from the engine's networks, and a create that a concurrent worker's network
overlaps moves on to the next slot.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import docker

__all__ = [
    "BRIDGE_PREFIX",
    "SERVICE_LABEL",
    "ServiceNetwork",
    "ServiceNetworkError",
    "bridge_name",
    "ensure_service_network",
    "free_slots",
    "network_name",
    "remove_service_network",
    "require_service_firewall",
    "service_networks",
]

SERVICE_LABEL = "org.mms.service"
BRIDGE_PREFIX = "mmss"  # service-network.sh's rules match mmss+
SLOT_PREFIX = 27
_FIREWALL_SCRIPT = "scripts/infra/service-network.sh --firewall"
# The jumps service-network.sh adds; each is checked with `iptables -C`.
_FIREWALL_RULES = (
    ("INPUT", "-i", f"{BRIDGE_PREFIX}+", "-j", "MMS-SVC-IN"),
    ("FORWARD", "-i", f"{BRIDGE_PREFIX}+", "-j", "MMS-SVC-FWD"),
    ("FORWARD", "-o", f"{BRIDGE_PREFIX}+", "-j", "MMS-SVC-FWD"),
)
_FIREWALL_CACHE_SECONDS = 30.0
# An attestation older than this is not trusted: the writer rewrites it every 30 s.
ATTESTATION_MAX_AGE_SECONDS = 90.0
_firewall_checked_at: float | None = None
_firewall_lock = threading.Lock()


class ServiceNetworkError(Exception):
    """A service's network cannot be made, or would not be contained; the message says what
    an operator does about it."""


@dataclass(frozen=True)
class ServiceNetwork:
    name: str
    bridge: str
    subnet: str
    gateway: str  # the host's address on the bridge


def network_name(service_id: uuid.UUID) -> str:
    return f"mms-svc-{service_id.hex}"


def bridge_name(service_id: uuid.UUID) -> str:
    return f"{BRIDGE_PREFIX}{service_id.hex[:10]}"  # 14 characters: interface names stop at 15


def require_service_firewall(attestation: Path | None = None) -> None:
    """Raise unless the host firewall of the service bridges is in place (its INPUT and
    FORWARD jumps); also when iptables cannot be asked (not root, not installed): fail closed.
    With ``attestation`` (MMS_SERVICE_FIREWALL_ATTESTATION), the file service-network.sh
    --attest keeps fresh where the engine runs is asked instead of iptables.
    A positive answer is trusted for 30 s."""
    global _firewall_checked_at
    with _firewall_lock:
        now = time.monotonic()
        if _firewall_checked_at is not None and now - _firewall_checked_at < _FIREWALL_CACHE_SECONDS:
            return
        if attestation is not None:
            _check_attestation(attestation)
            _firewall_checked_at = time.monotonic()
            return
        iptables = shutil.which("iptables") or next(
            (path for path in ("/usr/sbin/iptables", "/sbin/iptables") if shutil.which(path)), None
        )
        if iptables is None:
            raise ServiceNetworkError(
                "cannot check the service networks' host firewall: iptables is not installed "
                f"on the worker; run {_FIREWALL_SCRIPT} as root on the engine's host"
            )
        for rule in _FIREWALL_RULES:
            try:
                done = subprocess.run(
                    [iptables, "-w", "5", "-C", *rule], capture_output=True, text=True, timeout=10, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ServiceNetworkError(
                    f"cannot check the service networks' host firewall ({exc}); run {_FIREWALL_SCRIPT} "
                    "as root on the engine's host and give the worker the right to read iptables (root)"
                ) from None
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or [""])[-1][:200]
                raise ServiceNetworkError(
                    f"the service networks' host firewall is missing (iptables -C {' '.join(rule)}: "
                    f"{why or 'no such rule'}): without it a replica reaches the host's services; "
                    f"run {_FIREWALL_SCRIPT} as root on the engine's host (the worker must run as root to check it)"
                )
        _firewall_checked_at = time.monotonic()


def _check_attestation(path: Path) -> None:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError as exc:
        raise ServiceNetworkError(
            f"the service networks' host firewall is not attested ({path}: {exc.strerror}): without it a "
            f"replica reaches the host's services; where the engine runs, run scripts/infra/service-network.sh "
            f"--attest {path} as root every 30 s (the compose stack's engine does)"
        ) from None
    if not 0 <= age <= ATTESTATION_MAX_AGE_SECONDS:
        raise ServiceNetworkError(
            f"the service networks' host firewall was last attested {age:.0f} s ago ({path}; trusted for "
            f"{ATTESTATION_MAX_AGE_SECONDS:.0f} s): service-network.sh --attest has stopped running or its "
            "check fails where the engine runs"
        )


def ensure_service_network(
    api: docker.APIClient, service_id: uuid.UUID, pool: str, *, labels: Mapping[str, str] | None = None
) -> ServiceNetwork:
    """The service's network, made when missing (idempotent), on a free /27 of ``pool``;
    ``labels``: more labels for it (the installation that made it)."""
    name = network_name(service_id)
    found = _inspect(api, name)
    if found is not None:
        return _described(found, service_id)
    slots, free = free_slots(api, pool)
    for slot in free:
        gateway = str(next(slot.hosts()))
        try:
            api.create_network(
                name,
                driver="bridge",
                internal=True,
                enable_ipv6=False,
                check_duplicate=True,
                options={"com.docker.network.bridge.name": bridge_name(service_id)},
                ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(slot), gateway=gateway)]),
                labels={**(labels or {}), SERVICE_LABEL: str(service_id)},
            )
        except docker.errors.APIError as exc:
            found = _inspect(api, name)
            if found is not None:  # a concurrent worker made it first
                return _described(found, service_id)
            if "overlap" in str(exc.explanation or exc).lower():  # it took this slot: the next one
                continue
            raise ServiceNetworkError(
                f"the engine refused network {name} on {slot}: {exc.explanation or exc}"
            ) from None
        found = _inspect(api, name)
        if found is None:
            raise ServiceNetworkError(f"network {name} vanished right after it was made")
        return _described(found, service_id)
    raise ServiceNetworkError(
        f"no free /{SLOT_PREFIX} left in the service subnet pool {pool} ({len(slots)} slots, "
        f"{len(slots) - len(free)} taken by the engine's networks): delete unused services, or "
        "set MMS_SERVICE_SUBNET_POOL to a larger range no other network uses"
    )


def free_slots(api: docker.APIClient, pool: str) -> tuple[list[ipaddress.IPv4Network], list[ipaddress.IPv4Network]]:
    """Every /27 slot of ``pool``, and those no network of the engine overlaps."""
    slots = list(ipaddress.IPv4Network(pool).subnets(new_prefix=SLOT_PREFIX))
    taken = _subnets_in_use(api)
    return slots, [slot for slot in slots if not any(slot.overlaps(used) for used in taken)]


def remove_service_network(api: docker.APIClient, service_id: uuid.UUID) -> None:
    """Remove the service's network (every one labelled with its id); nothing when there is
    none. Its containers must be gone already: the engine refuses while they are attached."""
    for network in api.networks(filters={"label": f"{SERVICE_LABEL}={service_id}"}):
        with suppress(docker.errors.NotFound):
            api.remove_network(network["Id"])


def service_networks(api: docker.APIClient, *, label: str = SERVICE_LABEL) -> dict[uuid.UUID, str]:
    """Every service network on the engine (with ``label``, ``name=value`` or a name):
    service id -> network name (the orphan sweep's)."""
    found: dict[uuid.UUID, str] = {}
    for network in api.networks(filters={"label": [SERVICE_LABEL, label]}):
        with suppress(ValueError, TypeError):
            found[uuid.UUID((network.get("Labels") or {})[SERVICE_LABEL])] = network["Name"]
    return found


def _inspect(api: docker.APIClient, name: str) -> dict | None:
    try:
        return api.inspect_network(name)
    except docker.errors.NotFound:
        return None


def _described(network: dict, service_id: uuid.UUID) -> ServiceNetwork:
    """The network as a ServiceNetwork, after checking it is what this module makes: another
    one of that name would leave replicas uncontained."""
    name = network.get("Name", "")
    options = network.get("Options") or {}
    bridge = options.get("com.docker.network.bridge.name", "")
    configs = (network.get("IPAM") or {}).get("Config") or []
    if (
        (network.get("Labels") or {}).get(SERVICE_LABEL) != str(service_id)
        or network.get("Driver") != "bridge"
        or not network.get("Internal")
        or bridge != bridge_name(service_id)
        or len(configs) != 1
        or not configs[0].get("Subnet")
        or not configs[0].get("Gateway")
    ):
        raise ServiceNetworkError(
            f"network {name} exists but is not the service's contained network (label, internal "
            f"bridge {bridge_name(service_id)}, one subnet): remove it (docker network rm {name})"
        )
    return ServiceNetwork(name=name, bridge=bridge, subnet=configs[0]["Subnet"], gateway=configs[0]["Gateway"])


def _subnets_in_use(api: docker.APIClient) -> list[ipaddress.IPv4Network]:
    """The IPv4 subnets of the engine's networks: the service networks' slots, and whatever
    else a slot must not overlap (the build network, say)."""
    used = []
    for network in api.networks():
        for config in (network.get("IPAM") or {}).get("Config") or []:
            with suppress(ValueError, TypeError):
                subnet = ipaddress.ip_network(config.get("Subnet") or "", strict=False)
                if isinstance(subnet, ipaddress.IPv4Network):
                    used.append(subnet)
    return used
