"""A swarm a tenant attached, as the deploy worker opens it: the same driver as the operator's
swarm (workers/deploy/swarm.py), pointed at the tenant's manager.

The manager is another's engine, so: its address is judged by the fetch policy when the worker
connects (the API judged only an address written out: a name may resolve elsewhere by now),
and that checked address, never one the engine reports, is where the gateway reaches the tasks;
the engine connection goes to that checked address too, its certificate checked against the
name (a name is never resolved twice: no DNS rebinding between the check and the connection);
the sealed TLS material is unsealed into a private folder (0700, files 0600) under the data
folder that lives only as long as the connection (a worker starting removes those of workers
killed meanwhile: workers.scratch), and never goes to a log or an error message.

Where the gateway may send a tenant's scoring traffic is narrower than where the worker may
connect (``published_ports``): the fetch policy takes an allowed name at whatever address its
tenant points it to, and a replica's address lives on in the routes; so a task is published
only at a public address or one the operator allows as an address (not through a name), on a
port that entry allows, and never at an address of the operator's service networks
(MMS_SERVICE_SUBNET_POOL), where another tenant's replica answers. A task on another node is
reached at that node's address, which only the engine tells (``Node.Status.Addr``, the tenant's
``--advertise-addr``): judged by the same rule, node by node (``node_ports``), and routed to only
once the node is proven (``NodeJudge``: the engine at that address admits the tenant's client
certificate alone and says it is that node); a node refused or not proven takes no task (the
driver keeps tasks off it).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import docker
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import select

from app.addresses import in_service_pool, is_public_address
from app.config import compute_path
from app.context import ServiceContext
from app.database import session_scope
from app.orm import Account, Compute
from app.private_files import private_dir
from app.sealing import UnsealError
from workers.builders.docker import engine_client
from workers.deploy.local import EngineUnreachable, TargetRefused
from workers.deploy.swarm import SwarmDriver
from workers.fetch_policy import FOR_THIS_COMPUTE, fetch_policy_for_compute
from workers.fetcher import FetchError, FetchPolicy, Resolver, check_url
from workers.scratch import remove_orphaned_scratch, scratch_dir

__all__ = [
    "TLS_FOLDER",
    "NodeJudge",
    "in_service_pool",
    "node_ports",
    "prove_node",
    "published_ports",
    "remove_orphaned_tls",
    "swarm_driver_at",
    "tenant_swarm_driver",
    "unseal_tls",
]

# Under the data folder: the unsealed TLS material of the connections open now, each in a
# folder named after its worker process (workers.scratch), removed when the worker starts
# again if it was killed before its clean-up ran.
TLS_FOLDER = "tenant-tls"

log = logging.getLogger("mms.deploy")
# NAT64's well-known prefix: its addresses reach the IPv4 address in their last 32 bits.


@contextmanager
def tenant_swarm_driver(
    context: ServiceContext, *, account_id: uuid.UUID, compute_name: str, installation: str, publish: bool = True
) -> Iterator[SwarmDriver]:
    """A driver on the account's attached swarm ``compute_name``; TargetRefused when the target,
    its credentials or its manager's address will not do (``publish``: as the address of
    replicas too); EngineUnreachable when it does not answer."""
    with session_scope(context.session_factory) as session:
        found = session.execute(
            select(Compute, Account)
            .join(Account, Account.id == Compute.account_id)
            .where(Compute.account_id == account_id, Compute.name == compute_name)
        ).first()
        compute, account = found if found is not None else (None, None)
        if compute is None or compute.compute_type != "swarm" or not compute.sealed_credentials:
            raise TargetRefused(f"compute '{compute_name}' is not an attached swarm of the account")
        sealed, docker_host = compute.sealed_credentials, str((compute.properties or {}).get("dockerHost") or "")
        path = compute_path(account.subscription_id, account.resource_group, account.name, compute.name)
    try:
        tls = unseal_tls(context, sealed)
    except TargetRefused:
        raise TargetRefused(
            f"the credentials of compute '{compute_name}' cannot be read (was MMS_SECRET_KEY changed?): attach it again"
        ) from None
    with swarm_driver_at(
        context,
        docker_host=docker_host,
        tls=tls,
        installation=installation,
        target=f"compute '{compute_name}'",
        compute_path=path,
        publish=publish,
    ) as driver:
        yield driver


def unseal_tls(context: ServiceContext, sealed: str) -> dict[str, str]:
    """The TLS material (ca, cert, key: PEM) of a swarm's sealed credentials; TargetRefused when
    it cannot be read."""
    try:
        tls = json.loads(context.sealer.unseal(sealed))["tls"]
        return {name: str(tls[name]) for name in ("ca", "cert", "key")}
    except (UnsealError, ValueError, KeyError, TypeError):
        raise TargetRefused("the credentials cannot be read (was MMS_SECRET_KEY changed?)") from None


@contextmanager
def swarm_driver_at(
    context: ServiceContext,
    *,
    docker_host: str,
    tls: dict[str, str],
    installation: str,
    target: str,
    compute_path: str | None = None,
    publish: bool = True,
    resolver: Resolver = socket.getaddrinfo,
) -> Iterator[SwarmDriver]:
    """A driver on the tenant's manager ``docker_host`` (tcp://host:port) with its TLS material;
    ``target`` names it in messages, ``compute_path`` is the compute's (the private hosts the
    operator allows for it alone, MMS_COMPUTE_ALLOW_HOSTS: none for None). TargetRefused when
    the fetch policy refuses the manager's address, when it is in the operator's service
    networks, or (``publish``: the pass will route to its tasks) when no task may be published
    there; EngineUnreachable when it does
    not answer. Without ``publish`` (removing what runs there) no task gets an address."""
    manager = urlsplit(docker_host)
    policy = fetch_policy_for_compute(context.settings, compute_path)
    try:
        address = check_url(f"https://{manager.netloc}/", policy=policy, resolver=resolver)
        port = manager.port or 2376
    except FetchError as exc:
        if exc.reason in ("timeout", "resolve_failed"):  # the name did not resolve now: maybe later
            raise EngineUnreachable(f"{target}: its manager {manager.netloc}: {exc}") from None
        raise TargetRefused(f"{target}: its manager {manager.netloc} is refused: {exc}{FOR_THIS_COMPUTE}") from None
    except ValueError as exc:
        raise TargetRefused(f"{target}: its manager {manager.netloc} is refused: {exc}") from None
    if in_service_pool(address, context.settings.service_subnet_pool):
        raise TargetRefused(
            f"{target}: its manager {manager.netloc} is refused: its address is in the operator's service "
            "networks (MMS_SERVICE_SUBNET_POOL), where other services' replicas answer"
        )
    # The operator's own entries only: not those a development set-up adds for its asset URLs;
    # and those it allows for this compute alone, which vouch for an address as this tenant's.
    allow_hosts = FetchPolicy(
        allow_hosts=[*context.settings.fetch_allow_hosts, *context.settings.compute_allow_hosts_for(compute_path)]
    ).allow_hosts
    ports = published_ports(address, allow_hosts=allow_hosts)
    if publish and ports == frozenset():
        raise TargetRefused(
            f"{target}: its manager {manager.netloc} is at a non-public address that the operator allows "
            "only through its name, which may lead anywhere: the scoring gateway sends traffic only to a "
            "public address or one the operator lists as an address (MMS_COMPUTE_ALLOW_HOSTS for this "
            "compute, or MMS_FETCH_ALLOW_HOSTS: the address, or address:port for each port the tasks may "
            "publish)"
        )
    try:
        ipaddress.ip_address(manager.hostname or "")
        certified = None  # an address written out: what was checked
    except ValueError:
        certified = manager.hostname  # the certificate's; the connection goes to the address checked
    pinned = f"[{address}]" if ":" in address else address
    settings = context.settings
    with scratch_dir("swarm-tls", directory=private_dir(settings.data_dir / TLS_FOLDER)) as folder:
        paths = {name: Path(folder) / f"{name}.pem" for name in tls}
        for name, path in paths.items():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(tls[name])
        tls_config = docker.tls.TLSConfig(
            client_cert=(str(paths["cert"]), str(paths["key"])), ca_cert=str(paths["ca"]), verify=True
        )
        with SwarmDriver(
            f"tcp://{pinned}:{port}",
            installation=installation,
            subnet_pool=settings.service_subnet_pool,
            tmp_mb=settings.service_tmp_mb,
            pids=settings.service_pids,
            tls=tls_config,
            published_host=address,
            published_ports=ports if publish else frozenset(),
            node_ports=NodeJudge(
                tls=tls, paths=paths, policy=policy, allow_hosts=allow_hosts, pool=settings.service_subnet_pool
            )
            if publish
            else None,
            server_hostname=certified,
        ) as driver:
            yield driver


def remove_orphaned_tls(data_dir: Path) -> int:
    """Remove the TLS folders under ``data_dir`` of worker processes of this host that are gone
    (killed before their clean-up ran); how many. Never another live worker's: several may
    share the data folder."""
    return remove_orphaned_scratch(data_dir / TLS_FOLDER)


def published_ports(address: str, *, allow_hosts: frozenset[str]) -> frozenset[int] | None:
    """The ports at which the gateway may reach a task at ``address`` (the manager's, as the fetch
    policy checked it): None for any (a public address, or one ``allow_hosts`` lists as an address
    with no port), those of its ``address:port`` entries, or none (a non-public address allowed
    only through a name: its tenant points the name anywhere, another tenant's replica included)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return frozenset()
    if is_public_address(address):
        return None
    ports: set[int] = set()
    for entry in allow_hosts:
        listed, port = _as_address(entry)
        if listed != ip:
            continue
        if port is None:
            return None
        ports.add(port)
    return frozenset(ports)


# A node other than the manager takes tasks, and the gateway routes to it, only once proven. Its
# address is the tenant's word (``Status.Addr``), not proven as the manager's is by the worker's
# own connection; routed unproven, the gateway would send scoring traffic wherever the tenant
# claims (anyone's public host, or another tenant's node that the operator lists in
# MMS_FETCH_ALLOW_HOSTS, which is the installation's list). The proof: the worker connects to
# the engine at that address on NODE_ENGINE_PORT (if the fetch policy lets it), trusting the
# tenant's CA alone for that address; that engine must refuse a client without a certificate
# and one with a certificate nobody signed (an engine open to anyone proves nothing of whose it
# is), and say to the tenant's certificate that it is that node (/info: ``Swarm.NodeID``). So a
# node is routed to only where an engine that admits the tenant's certificate runs.
NODE_ENGINE_PORT = 2376
PROOF_SECONDS = 10.0  # one node's proof, all its connections (and never past the pass's deadline)
MAX_PROOFS_A_PASS = 3  # proofs not yet known a pass makes (the rest wait for later passes)
PROVEN_SECONDS = 300.0  # how long a proof is kept (then re-proven; it stands as long again
FAILED_PROOF_SECONDS = 60.0  # while a pass has no proof left to make); a failure, this long
# Proofs are kept per TLS material (a tenant's credentials), each set bounded: one tenant's
# failures (any number of node IDs its engine makes up) never push out another's proofs.
_PROOFS_PER_MATERIAL = 128
_MAX_MATERIALS = 1024
_proofs: OrderedDict[str, OrderedDict[str, tuple[bool, float]]] = OrderedDict()
_proofs_lock = threading.Lock()


class NodeJudge:
    """One pass's judgement of a tenant's other nodes (``SwarmDriver``'s ``node_ports``): the
    ports the gateway may reach on a node, by the manager's rule (``node_ports``), once the node
    is proven (``prove_node``); frozenset() for a node refused or not proven (yet), which
    ``pending`` tells apart: a node not proven yet gets no route but fails no generation."""

    def __init__(
        self,
        *,
        tls: dict[str, str],
        paths: dict[str, Path],
        policy: FetchPolicy,
        allow_hosts: frozenset[str],
        pool: str,
    ) -> None:
        self._material = hashlib.sha256(json.dumps(tls, sort_keys=True).encode()).hexdigest()
        self._paths = paths
        self._policy = policy
        self._allow_hosts = allow_hosts
        self._pool = pool
        self._proofs_left = MAX_PROOFS_A_PASS
        self._pending: set[str] = set()

    def __call__(self, node_id: str, address: str, deadline: float) -> frozenset[int] | None:
        ports = node_ports(address, allow_hosts=self._allow_hosts, pool=self._pool)
        if ports == frozenset():
            return ports
        if self._proven(node_id, address, deadline):
            return ports
        self._pending.add(node_id)
        return frozenset()

    def pending(self, node_id: str) -> bool:
        """Whether the node was refused only for want of a proof (so far)."""
        return node_id in self._pending

    def _proven(self, node_id: str, address: str, deadline: float) -> bool:
        now = time.monotonic()
        proven_key, failed_key = f"{node_id} {address}", address  # a failure is the address's
        with _proofs_lock:
            kept = _proofs.get(self._material, {})
            known = kept.get(proven_key)
            failed = kept.get(failed_key)
        if failed is not None and now < failed[1]:
            return False
        if known is not None and now < known[1]:
            return True
        if self._proofs_left <= 0 or now >= deadline:
            # A later pass proves it; a proof only just out of date stands until then (routes
            # to many nodes do not all drop at once when their proofs age together).
            return known is not None and now < known[1] + PROVEN_SECONDS
        self._proofs_left -= 1
        proven = prove_node(node_id, address, paths=self._paths, policy=self._policy, deadline=deadline)
        log.info("deploy.node_proof", extra={"node": node_id, "proven": proven})
        key, keep = (proven_key, PROVEN_SECONDS) if proven else (failed_key, FAILED_PROOF_SECONDS)
        with _proofs_lock:
            kept = _proofs.setdefault(self._material, OrderedDict())
            _proofs.move_to_end(self._material)
            kept.pop(proven_key if not proven else failed_key, None)
            kept[key] = (proven, time.monotonic() + keep)
            kept.move_to_end(key)
            while len(kept) > _PROOFS_PER_MATERIAL:
                kept.popitem(last=False)
            while len(_proofs) > _MAX_MATERIALS:
                _proofs.popitem(last=False)
        return proven


def prove_node(
    node_id: str,
    address: str,
    *,
    paths: dict[str, Path],
    policy: FetchPolicy,
    port: int = NODE_ENGINE_PORT,
    deadline: float | None = None,
) -> bool:
    """Whether the engine at ``address`` (a node's, the tenant's word) on ``port`` is the
    node ``node_id`` of the tenant whose TLS material is at ``paths`` (ca, cert, key): its
    certificate for that address signed by the tenant's CA, a client without a certificate or
    with one nobody signed refused, and the tenant's client certificate answered with that
    node ID; all by ``deadline`` (at most PROOF_SECONDS from now)."""
    host = f"[{address}]" if ":" in address else address
    try:
        check_url(f"https://{host}:{port}/", policy=policy)
    except (FetchError, ValueError):
        return False
    url = f"tcp://{host}:{port}"
    deadline = min(deadline or math.inf, time.monotonic() + PROOF_SECONDS)
    ca = str(paths["ca"])
    nobody = _nobodys_certificate(paths["ca"].parent)
    for stranger in (None, nobody):  # an engine that admits either is open to anyone
        if _node_id_at(url, docker.tls.TLSConfig(client_cert=stranger, ca_cert=ca, verify=True), deadline) is not None:
            return False
    tenant = docker.tls.TLSConfig(client_cert=(str(paths["cert"]), str(paths["key"])), ca_cert=ca, verify=True)
    return _node_id_at(url, tenant, deadline) == node_id


@functools.cache
def _nobodys_key_and_certificate() -> tuple[bytes, bytes]:
    """A client certificate nobody signed (made once a process): PEM key, PEM certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nobody")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem_key, certificate.public_bytes(serialization.Encoding.PEM)


def _nobodys_certificate(folder: Path) -> tuple[str, str]:
    """The certificate nobody signed and its key, as files in ``folder`` (the connection's
    private TLS folder): (certificate path, key path)."""
    pem_key, pem_certificate = _nobodys_key_and_certificate()
    paths = (folder / "nobody-cert.pem", folder / "nobody-key.pem")
    for path, content in zip(paths, (pem_certificate, pem_key), strict=True):
        if not path.exists():
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
    return str(paths[0]), str(paths[1])


def _node_id_at(url: str, tls: docker.tls.TLSConfig, deadline: float) -> str | None:
    """The node ID the engine at ``url`` gives in /info (through the tenant engines' bounds,
    by ``deadline``), None when it does not say or cannot be reached."""
    if time.monotonic() >= deadline:
        return None
    try:
        client = engine_client(url, timeout=int(PROOF_SECONDS), tls=tls, deadline=deadline)
    except Exception:  # noqa: BLE001 - refused, unreachable, late, an answer past its bound: no proof
        return None
    try:
        info = client.info()
    except Exception:  # noqa: BLE001 - as above
        return None
    finally:
        client.close()
    swarm = info.get("Swarm") if isinstance(info, Mapping) else None
    node = swarm.get("NodeID") if isinstance(swarm, Mapping) else None
    return node if isinstance(node, str) else None


def node_ports(address: str, *, allow_hosts: frozenset[str], pool: str) -> frozenset[int] | None:
    """The ports at which the gateway may reach a task on a node at ``address`` (its
    ``Status.Addr``: the engine's word), if the node is proven (``NodeJudge``): the manager's
    rule (``published_ports``), and none in the operator's service networks ``pool``."""
    if in_service_pool(address, pool):
        return frozenset()
    return published_ports(address, allow_hosts=allow_hosts)


def _as_address(entry: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address | None, int | None]:
    """An allow entry read as an address and its port (None: any): ``a.b.c.d``, ``a.b.c.d:port``,
    ``v6``, ``[v6]``, ``[v6]:port``; (None, None) for a name."""
    try:
        return ipaddress.ip_address(entry), None
    except ValueError:
        pass
    try:
        parts = urlsplit(f"//{entry}")
        return ipaddress.ip_address(parts.hostname or ""), parts.port
    except ValueError:
        return None, None
