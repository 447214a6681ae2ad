"""Compute targets: the built-in ones (settings, in every account: ``local``, the workers'
engine, and ``swarm``, the operator's swarm) and those a tenant attaches (swarm, kubernetes),
whose credentials are sealed and never shown again."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.addresses import in_service_pool, is_public_address
from app.deployments.kubeconfig import WHOLE_FILE, KubeconfigRefused, check_kubeconfig
from app.deployments.states import ServiceState
from app.errors import Conflict, NotFound, ValidationFailed
from app.orm import Account, Compute, Service
from app.schemas.services import ComputePut
from app.sealing import Sealer, UnsealError
from app.services.accounts import AccountRef

LOCAL = "local"
SWARM = "swarm"  # the operator's swarm (MMS_SWARM_DOCKER_HOST), when set


@dataclass(frozen=True)
class Target:
    """A compute target as the API shows it (a row's, or the built-in ``local``)."""

    name: str
    compute_type: str
    properties: dict[str, Any]
    built_in: bool
    has_credentials: bool
    created_at: datetime | None


def invalid(field: str, reason: str) -> ValidationFailed:
    """A 400 naming ``field`` of the request body."""
    message = f"{field}: {reason}"
    return ValidationFailed(f"Invalid request: {message}", details=[{"code": "InvalidField", "message": message}])


def _built_in(name: str) -> Target:
    return Target(name, name, {}, built_in=True, has_credentials=False, created_at=None)


def _built_ins(*, local_enabled: bool, swarm_enabled: bool) -> list[str]:
    return [name for name, on in ((LOCAL, local_enabled), (SWARM, swarm_enabled)) if on]


def _target(compute: Compute) -> Target:
    return Target(
        compute.name,
        compute.compute_type,
        dict(compute.properties),
        built_in=False,
        has_credentials=compute.sealed_credentials is not None,
        created_at=compute.created_at,
    )


def is_tenant_swarm(compute_type: str, *, attached: bool) -> bool:
    """Whether a service's target is a swarm the tenant attached, not the operator's built-in one
    (``attached``: as the service recorded it when it was made, whatever the settings say now)."""
    return compute_type == SWARM and attached


def _built_in_name(name: str, *, swarm_enabled: bool) -> str | None:
    """The built-in target ``name`` names (any case), if any: ``local`` always (refused as an
    attached name), ``swarm`` when the operator's swarm is set."""
    lowered = name.lower()
    return lowered if lowered == LOCAL or (lowered == SWARM and swarm_enabled) else None


def list_targets(
    session: Session, account: AccountRef, *, local_enabled: bool, swarm_enabled: bool = False
) -> list[Target]:
    """The built-in targets first (``local`` when the workers have an engine, ``swarm`` when the
    operator set one), then the attached targets by name."""
    attached = session.scalars(select(Compute).where(Compute.account_id == account.id).order_by(Compute.name))
    built_in = _built_ins(local_enabled=local_enabled, swarm_enabled=swarm_enabled)
    return [_built_in(name) for name in built_in] + [_target(c) for c in attached if c.name not in built_in]


def _find(
    session: Session, account: AccountRef, name: str, *, lock: bool = False, share: bool = False
) -> Compute | None:
    """The attached target ``name``; ``lock``: its row locked until the commit (``share``: FOR
    SHARE, as a service's create takes it; else FOR UPDATE, as a move or a detach takes it
    before counting the services on it: one waits for the other, so a service is never made on
    a target that a concurrent request moves or detaches)."""
    query = select(Compute).where(Compute.account_id == account.id, Compute.name == name)
    if lock:
        query = query.with_for_update(read=share)
    return session.scalars(query).first()


def get_target(
    session: Session,
    account: AccountRef,
    *,
    name: str,
    local_enabled: bool,
    swarm_enabled: bool = False,
    for_service: bool = False,
) -> Target:
    """One target by name, or 404. ``for_service``: a service is being made on it, in this
    transaction: an attached target's row is share-locked until the commit (see ``_find``)."""
    built_in = _built_in_name(name, swarm_enabled=swarm_enabled)
    if built_in in _built_ins(local_enabled=local_enabled, swarm_enabled=swarm_enabled):
        return _built_in(built_in)
    if for_service and not built_in:
        # The account's row first (FOR KEY SHARE, as the service's insert takes it anyway): an
        # account's delete locks it before its cascade takes the target's row, so taking the
        # target's first would let the two wait on each other.
        session.execute(select(Account.id).where(Account.id == account.id).with_for_update(read=True, key_share=True))
    compute = None if built_in else _find(session, account, name, lock=for_service, share=True)
    if compute is None:
        raise NotFound(f"compute '{name}' was not found in this account", code="ComputeNotFound")
    return _target(compute)


def _in_use(session: Session, account: AccountRef, name: str, *, deleting_too: bool = True) -> int:
    """How many of the account's services use the target ``name``; ``deleting_too=False``: not
    counting those being deleted."""
    query = select(func.count()).select_from(Service)
    query = query.where(Service.account_id == account.id, Service.compute_name == name)
    if not deleting_too:
        query = query.where(Service.state != ServiceState.DELETING)
    return session.scalar(query) or 0


def _check_kubeconfig(text: str, *, allow_insecure_tls: bool) -> None:
    """The service's kubeconfig policy (app/deployments/kubeconfig.py), all but the servers'
    addresses: those are judged by the worker's fetch policy when it connects (a name resolved
    now may lead elsewhere then), so a cluster on a private address is refused at that point."""
    try:
        check_kubeconfig(text, allow_insecure_tls=allow_insecure_tls)
    except KubeconfigRefused as exc:
        where = "" if exc.field == WHOLE_FILE else f"{exc.field} "
        raise invalid("properties.kubeconfig", f"{where}{exc.reason}") from None


# One PEM block or more and nothing else (headers such as DEK-Info included): the worker hands
# these to TLS as they are, so a value that is not wholly inline PEM (a file's path, say) is refused.
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n[A-Za-z0-9+/=:, \t\r\n-]*?-----END \1-----\s*")


def _is_inline_pem(text: str) -> bool:
    position, text = 0, text.lstrip()
    while position < len(text):
        block = _PEM_BLOCK.match(text, position)
        if block is None:
            return False
        position = block.end()
    return position > 0


def _check_docker_host(docker_host: str | None, allow_hosts: frozenset[str], service_pool: str) -> None:
    host = urlsplit(docker_host or "")
    try:
        port = host.port
    except ValueError:
        port = None
    # No path, query or userinfo: the manager's TLS port and nothing the client could read as a
    # socket, a file or a credential (and dockerHost is shown to Readers: no login or token in it).
    if (
        host.scheme != "tcp"
        or not host.hostname
        or not port
        or host.path not in ("", "/")
        or any(c in (docker_host or "") for c in "?#@")
    ):
        raise invalid("properties.dockerHost", "must be tcp://host:port (the manager's TLS port), nothing more")
    # An address written out is judged here, as the fetcher judges what a name resolves to (a
    # name is judged by the worker when it connects: it may resolve elsewhere by then).
    literal = host.hostname
    if _legacy_ipv4(literal):
        raise invalid(
            "properties.dockerHost",
            f"write the manager's IPv4 address as four decimal numbers (a.b.c.d), not '{literal}'",
        )
    try:
        ipaddress.ip_address(literal.split("%", 1)[0])
    except ValueError:
        return
    if in_service_pool(literal, service_pool):  # allowed or not: the workers refuse it too
        raise invalid(
            "properties.dockerHost",
            f"{literal} is in the operator's service networks (MMS_SERVICE_SUBNET_POOL), where other "
            "services' replicas answer: a swarm manager cannot be there",
        )
    # As the fetch policy matches: the address, bracketed when IPv6, or with the port.
    written = f"[{literal.lower()}]" if ":" in literal else literal.lower()
    if not is_public_address(literal) and not {literal.lower(), written, host.netloc.lower()} & allow_hosts:
        raise invalid(
            "properties.dockerHost",
            f"{literal} is not a public address (loopback, private, link-local or reserved): the service's "
            "own network is not a tenant's to reach; an operator may allow it for this compute "
            "(MMS_COMPUTE_ALLOW_HOSTS) or for everyone (MMS_FETCH_ALLOW_HOSTS)",
        )


def _legacy_ipv4(name: str) -> bool:
    """A name a resolver reads as an IPv4 address though it is no dotted quad (``167772165``,
    ``0x0a000005``, ``10.5``, ``012.0.0.5``, a trailing dot): judged as an address here, it
    would pass as a name and be refused only when the worker connects."""
    try:
        socket.inet_aton(name.rstrip("."))
    except OSError:
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return True
    return False


def _settings_and_credentials(
    body: ComputePut, *, allow_insecure_tls: bool, allow_hosts: frozenset[str], service_pool: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the target shows (properties) and what is sealed (credentials), checked."""
    props = body.properties
    if body.type == "local":
        raise invalid(
            "type", "local is built in: it exists whenever the workers have an engine; attach swarm or kubernetes"
        )
    if body.type == "swarm":
        if props.kubeconfig is not None or props.namespace is not None:
            raise invalid("properties", "a swarm target takes dockerHost and tls, not kubeconfig or namespace")
        _check_docker_host(props.dockerHost, allow_hosts, service_pool)
        if props.tls is None:
            raise invalid("properties.tls", "is required: a swarm manager is reached over TLS only")
        for name, value in props.tls.model_dump().items():
            if not _is_inline_pem(value):
                raise invalid(f"properties.tls.{name}", "must be inline PEM (-----BEGIN ...-----), not a file's path")
        return {"dockerHost": props.dockerHost}, {"tls": props.tls.model_dump()}
    if props.dockerHost is not None or props.tls is not None:
        raise invalid("properties", "a kubernetes target takes kubeconfig and namespace, not dockerHost or tls")
    if props.kubeconfig is None:
        raise invalid("properties.kubeconfig", "is required for a kubernetes target")
    _check_kubeconfig(props.kubeconfig, allow_insecure_tls=allow_insecure_tls)
    return {"namespace": props.namespace or "default"}, {"kubeconfig": props.kubeconfig}


def put_target(
    session: Session,
    account: AccountRef,
    *,
    name: str,
    body: ComputePut,
    sealer: Sealer,
    created_by: str | None,
    allow_insecure_tls: bool = False,
    swarm_enabled: bool = False,
    allow_hosts: frozenset[str] = frozenset(),
    service_pool: str,
) -> tuple[Target, bool]:
    """Attach a target, or replace its settings; whether it is new. ``local`` (and ``swarm``
    when the operator set one) is built in (409). ``allow_insecure_tls``: a kubeconfig may turn
    off the check of its cluster's certificate; ``allow_hosts``: private addresses a swarm
    manager may have (MMS_FETCH_ALLOW_HOSTS's, and MMS_COMPUTE_ALLOW_HOSTS's for this compute);
    ``service_pool``: the operator's service networks
    (MMS_SERVICE_SUBNET_POOL), where none may be."""
    built_in = _built_in_name(name, swarm_enabled=swarm_enabled)
    if built_in:
        raise Conflict(f"compute '{built_in}' is built in: it cannot be attached or changed", code="BuiltInCompute")
    properties, credentials = _settings_and_credentials(
        body, allow_insecure_tls=allow_insecure_tls, allow_hosts=allow_hosts, service_pool=service_pool
    )
    sealed = sealer.seal(json.dumps(credentials).encode())
    compute = _find(session, account, name, lock=True)
    if compute is None:
        compute = Compute(
            account_id=account.id,
            name=name,
            compute_type=body.type,
            properties=properties,
            sealed_credentials=sealed,
            created_by=created_by,
        )
        try:
            with session.begin_nested():
                session.add(compute)
                session.flush()
            return _target(compute), True
        except IntegrityError:  # another request attached it a moment ago: this PUT replaces it
            compute = _find(session, account, name, lock=True)
            if compute is None:  # not a duplicate: the account went meanwhile (409 ReferenceDeleted)
                raise
    moved = _moved(compute, body.type, properties, credentials, sealer)
    # A service being deleted does not hold its target's place: a delete that waits on a target
    # the worker may not reach (refused, away) completes once the tenant points it elsewhere.
    if moved and _in_use(session, account, name, deleting_too=moved == "type"):
        # What runs there now would be left behind: passes and deletes would reach only the new
        # place (a manager of the same swarm, or another swarm, cannot be told apart here), and a
        # cleanup queued for the old one could remove the very tasks that serve. The tenant
        # deletes the services first (each removes what it made), then moves the target.
        raise Conflict(
            f"compute '{name}' runs services: its {moved} cannot change until they are deleted (new "
            "credentials for the same address can be given at any time)",
            code="ComputeInUse",
        )
    compute.compute_type, compute.properties, compute.sealed_credentials = body.type, properties, sealed
    session.flush()
    return _target(compute), False


def _moved(
    compute: Compute, compute_type: str, properties: dict[str, Any], credentials: dict[str, Any], sealer: Sealer
) -> str | None:
    """What of a target's place the new settings change, if any: its type, a swarm's manager
    address, a kubernetes target's namespace or its current context's server. New credentials
    for the same place (a renewed certificate or token) are no move."""
    if compute.compute_type != compute_type:
        return "type"
    if compute_type == "swarm":
        return "dockerHost" if (compute.properties or {}).get("dockerHost") != properties["dockerHost"] else None
    if ((compute.properties or {}).get("namespace") or "default") != properties["namespace"]:
        return "namespace"
    if compute.sealed_credentials is None:
        return None
    # Only where each leads is read here: the policy was applied to each as it was given (an
    # insecure-TLS one, say, that the operator allows), so none is refused for that now.
    try:
        old = json.loads(sealer.unseal(compute.sealed_credentials))["kubeconfig"]
        servers = {check_kubeconfig(text, allow_insecure_tls=True).server for text in (old, credentials["kubeconfig"])}
    except (KubeconfigRefused, UnsealError, ValueError, KeyError, TypeError):  # no telling where the old one led
        return "cluster"
    return "cluster" if len(servers) > 1 else None


def delete_target(session: Session, account: AccountRef, *, name: str, swarm_enabled: bool = False) -> None:
    """Detach a target no service uses; the built-in ones cannot be (409)."""
    built_in = _built_in_name(name, swarm_enabled=swarm_enabled)
    if built_in:
        raise Conflict(f"compute '{built_in}' is built in: it cannot be detached", code="BuiltInCompute")
    compute = _find(session, account, name, lock=True)
    if compute is None:
        raise NotFound(f"compute '{name}' was not found in this account", code="ComputeNotFound")
    in_use = _in_use(session, account, name)
    if in_use:
        raise Conflict(f"compute '{name}' runs {in_use} service(s): delete them first", code="ComputeInUse")
    session.delete(compute)
    session.flush()
