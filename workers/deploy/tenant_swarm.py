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
``--advertise-addr``): judged by the same rule, node by node (``node_ports``); a node refused
takes no task (the driver keeps tasks off it).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import docker
from sqlalchemy import select

from app.addresses import in_service_pool, is_public_address
from app.context import ServiceContext
from app.database import session_scope
from app.orm import Compute
from app.private_files import private_dir
from app.sealing import UnsealError
from workers.deploy.local import EngineUnreachable, TargetRefused
from workers.deploy.swarm import SwarmDriver
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, FetchPolicy, Resolver, check_url
from workers.scratch import remove_orphaned_scratch, scratch_dir

__all__ = [
    "TLS_FOLDER",
    "in_service_pool",
    "node_ports",
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
# NAT64's well-known prefix: its addresses reach the IPv4 address in their last 32 bits.


@contextmanager
def tenant_swarm_driver(
    context: ServiceContext, *, account_id: uuid.UUID, compute_name: str, installation: str, publish: bool = True
) -> Iterator[SwarmDriver]:
    """A driver on the account's attached swarm ``compute_name``; TargetRefused when the target,
    its credentials or its manager's address will not do (``publish``: as the address of
    replicas too); EngineUnreachable when it does not answer."""
    with session_scope(context.session_factory) as session:
        compute = session.scalars(
            select(Compute).where(Compute.account_id == account_id, Compute.name == compute_name)
        ).first()
        if compute is None or compute.compute_type != "swarm" or not compute.sealed_credentials:
            raise TargetRefused(f"compute '{compute_name}' is not an attached swarm of the account")
        sealed, docker_host = compute.sealed_credentials, str((compute.properties or {}).get("dockerHost") or "")
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
    publish: bool = True,
    resolver: Resolver = socket.getaddrinfo,
) -> Iterator[SwarmDriver]:
    """A driver on the tenant's manager ``docker_host`` (tcp://host:port) with its TLS material;
    ``target`` names it in messages. TargetRefused when the fetch policy refuses the manager's
    address, when it is in the operator's service networks, or (``publish``: the pass will
    route to its tasks) when no task may be published there; EngineUnreachable when it does
    not answer. Without ``publish`` (removing what runs there) no task gets an address."""
    manager = urlsplit(docker_host)
    policy = fetch_policy(context.settings)
    try:
        address = check_url(f"https://{manager.netloc}/", policy=policy, resolver=resolver)
        port = manager.port or 2376
    except FetchError as exc:
        if exc.reason in ("timeout", "resolve_failed"):  # the name did not resolve now: maybe later
            raise EngineUnreachable(f"{target}: its manager {manager.netloc}: {exc}") from None
        raise TargetRefused(f"{target}: its manager {manager.netloc} is refused: {exc}") from None
    except ValueError as exc:
        raise TargetRefused(f"{target}: its manager {manager.netloc} is refused: {exc}") from None
    if in_service_pool(address, context.settings.service_subnet_pool):
        raise TargetRefused(
            f"{target}: its manager {manager.netloc} is refused: its address is in the operator's service "
            "networks (MMS_SERVICE_SUBNET_POOL), where other services' replicas answer"
        )
    # The operator's own entries only: not those a development set-up adds for its asset URLs.
    allow_hosts = FetchPolicy(allow_hosts=context.settings.fetch_allow_hosts).allow_hosts
    ports = published_ports(address, allow_hosts=allow_hosts)
    if publish and ports == frozenset():
        raise TargetRefused(
            f"{target}: its manager {manager.netloc} is at a non-public address that the operator allows "
            "only through its name, which may lead anywhere: the scoring gateway sends traffic only to a "
            "public address or one the operator lists as an address (MMS_FETCH_ALLOW_HOSTS: the address, "
            "or address:port for each port the tasks may publish)"
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
            node_ports=functools.partial(node_ports, allow_hosts=allow_hosts, pool=context.settings.service_subnet_pool)
            if publish and ROUTE_OTHER_NODES
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


# Tasks on a tenant's nodes other than its manager are not routed to yet: every task is pinned
# to the manager. A node's address is the tenant's word (``Status.Addr``), not proven as the
# manager's is by the worker's own TLS connection to it, and the gateway would send scoring
# traffic wherever it claims: a public host of anyone's, or another tenant's node that the
# operator lists in MMS_FETCH_ALLOW_HOSTS (the list is the installation's, not a tenant's).
# The routing below is built and tested on two nodes; it is turned on once each node is proven
# (design: "Multi-node swarm", the attacker's review of 2026-12-04).
ROUTE_OTHER_NODES = False


def node_ports(address: str, *, allow_hosts: frozenset[str], pool: str) -> frozenset[int] | None:
    """The ports at which the gateway may reach a task on a node at ``address`` (its
    ``Status.Addr``: the engine's word, checked by nobody yet): the manager's rule
    (``published_ports``), and none in the operator's service networks ``pool``."""
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
