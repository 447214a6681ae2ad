"""A swarm a tenant attached, as the deploy worker opens it: the same driver as the operator's
swarm (workers/deploy/swarm.py), pointed at the tenant's manager.

The manager is another's engine, so: its address is judged by the fetch policy when the worker
connects (the API judged only an address written out: a name may resolve elsewhere by now),
and that checked address, never one the engine reports, is where the gateway reaches the tasks;
the engine connection goes to that checked address too, its certificate checked against the
name (a name is never resolved twice: no DNS rebinding between the check and the connection);
the sealed TLS material is unsealed into a private folder (0700, files 0600) that lives only as
long as the connection, and never goes to a log or an error message.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import docker
from sqlalchemy import select

from app.context import ServiceContext
from app.database import session_scope
from app.orm import Compute
from app.sealing import UnsealError
from workers.deploy.local import TargetRefused
from workers.deploy.swarm import SwarmDriver
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, Resolver, check_url

__all__ = ["swarm_driver_at", "tenant_swarm_driver", "unseal_tls"]


@contextmanager
def tenant_swarm_driver(
    context: ServiceContext, *, account_id: uuid.UUID, compute_name: str, installation: str
) -> Iterator[SwarmDriver]:
    """A driver on the account's attached swarm ``compute_name``; TargetRefused when the target,
    its credentials or its manager's address will not do; EngineUnreachable when it does not answer."""
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
        context, docker_host=docker_host, tls=tls, installation=installation, target=f"compute '{compute_name}'"
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
    resolver: Resolver = socket.getaddrinfo,
) -> Iterator[SwarmDriver]:
    """A driver on the tenant's manager ``docker_host`` (tcp://host:port) with its TLS material;
    ``target`` names it in messages. TargetRefused when the fetch policy refuses the manager's
    address; EngineUnreachable when it does not answer."""
    manager = urlsplit(docker_host)
    try:
        address = check_url(f"https://{manager.netloc}/", policy=fetch_policy(context.settings), resolver=resolver)
        port = manager.port or 2376
    except (FetchError, ValueError) as exc:
        raise TargetRefused(f"{target}: its manager {manager.netloc} is refused: {exc}") from None
    try:
        ipaddress.ip_address(manager.hostname or "")
        certified = None  # an address written out: what was checked
    except ValueError:
        certified = manager.hostname  # the certificate's; the connection goes to the address checked
    pinned = f"[{address}]" if ":" in address else address
    settings = context.settings
    with tempfile.TemporaryDirectory(prefix="mms-swarm-tls-") as folder:
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
            server_hostname=certified,
        ) as driver:
            yield driver
