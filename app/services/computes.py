"""Compute targets: ``local`` (a setting: the workers' engine, in every account) and those a
tenant attaches (swarm, kubernetes), whose credentials are sealed and never shown again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import yaml
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound, ValidationFailed
from app.orm import Compute, Service
from app.schemas.services import ComputePut
from app.sealing import Sealer
from app.services.accounts import AccountRef

LOCAL = "local"


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


def _local() -> Target:
    return Target(LOCAL, "local", {}, built_in=True, has_credentials=False, created_at=None)


def _target(compute: Compute) -> Target:
    return Target(
        compute.name,
        compute.compute_type,
        dict(compute.properties),
        built_in=False,
        has_credentials=compute.sealed_credentials is not None,
        created_at=compute.created_at,
    )


def _is_local(name: str) -> bool:
    return name.lower() == LOCAL


def list_targets(session: Session, account: AccountRef, *, local_enabled: bool) -> list[Target]:
    """``local`` first (when the workers have an engine), then the attached targets by name."""
    attached = session.scalars(select(Compute).where(Compute.account_id == account.id).order_by(Compute.name))
    return ([_local()] if local_enabled else []) + [_target(c) for c in attached]


def _find(session: Session, account: AccountRef, name: str) -> Compute | None:
    return session.scalars(select(Compute).where(Compute.account_id == account.id, Compute.name == name)).first()


def get_target(session: Session, account: AccountRef, *, name: str, local_enabled: bool) -> Target:
    """One target by name, or 404."""
    if _is_local(name) and local_enabled:
        return _local()
    compute = None if _is_local(name) else _find(session, account, name)
    if compute is None:
        raise NotFound(f"compute '{name}' was not found in this account", code="ComputeNotFound")
    return _target(compute)


def _in_use(session: Session, account: AccountRef, name: str) -> int:
    return (
        session.scalar(
            select(func.count())
            .select_from(Service)
            .where(Service.account_id == account.id, Service.compute_name == name)
        )
        or 0
    )


# Keys of a kubeconfig that run a command or read the worker's files: refused from tenants.
_HOSTILE_KUBECONFIG_KEYS = {"exec", "auth-provider", "tokenFile"}


def _hostile_keys(value: object) -> Iterator[str]:
    # Iterative, each object once: YAML aliases share objects, so a small document can stand
    # for an exponentially large tree.
    seen: set[int] = set()
    pending = [value]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if key in _HOSTILE_KUBECONFIG_KEYS or (isinstance(key, str) and key.endswith("-file")):
                    yield str(key)
                pending.append(child)
        elif isinstance(item, list):
            pending.extend(item)


def _check_kubeconfig(text: str) -> None:
    try:
        config = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        raise invalid("properties.kubeconfig", "is not YAML") from None
    if not isinstance(config, dict) or not config.get("clusters"):
        raise invalid("properties.kubeconfig", "must be a kubeconfig with its clusters")
    hostile = sorted(set(_hostile_keys(config)))
    if hostile:
        raise invalid(
            "properties.kubeconfig",
            f"must carry its credentials inline (*-data, token); refused: {', '.join(hostile)}",
        )


def _settings_and_credentials(body: ComputePut) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the target shows (properties) and what is sealed (credentials), checked."""
    props = body.properties
    if body.type == "local":
        raise invalid(
            "type", "local is built in: it exists whenever the workers have an engine; attach swarm or kubernetes"
        )
    if body.type == "swarm":
        if props.kubeconfig is not None or props.namespace is not None:
            raise invalid("properties", "a swarm target takes dockerHost and tls, not kubeconfig or namespace")
        host = urlsplit(props.dockerHost or "")
        try:
            port = host.port
        except ValueError:
            port = None
        # Nothing but an address: dockerHost is shown to Readers, so no login, token or query in it.
        extras = host.username is not None or any(c in (props.dockerHost or "") for c in "?#")
        if host.scheme != "tcp" or not host.hostname or not port or host.path not in ("", "/") or extras:
            raise invalid("properties.dockerHost", "must be tcp://host:port (the manager's TLS port), nothing more")
        if props.tls is None:
            raise invalid("properties.tls", "is required: a swarm manager is reached over TLS only")
        return {"dockerHost": props.dockerHost}, {"tls": props.tls.model_dump()}
    if props.dockerHost is not None or props.tls is not None:
        raise invalid("properties", "a kubernetes target takes kubeconfig and namespace, not dockerHost or tls")
    if props.kubeconfig is None:
        raise invalid("properties.kubeconfig", "is required for a kubernetes target")
    _check_kubeconfig(props.kubeconfig)
    return {"namespace": props.namespace or "default"}, {"kubeconfig": props.kubeconfig}


def put_target(
    session: Session, account: AccountRef, *, name: str, body: ComputePut, sealer: Sealer, created_by: str | None
) -> tuple[Target, bool]:
    """Attach a target, or replace its settings; whether it is new. ``local`` is built in (409)."""
    if _is_local(name):
        raise Conflict("compute 'local' is built in: it cannot be attached or changed", code="BuiltInCompute")
    properties, credentials = _settings_and_credentials(body)
    sealed = sealer.seal(json.dumps(credentials).encode())
    compute = _find(session, account, name)
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
            compute = _find(session, account, name)
            if compute is None:  # not a duplicate: the account went meanwhile (409 ReferenceDeleted)
                raise
    if compute.compute_type != body.type and _in_use(session, account, name):
        raise Conflict(
            f"compute '{name}' runs services: its type cannot change until they are deleted", code="ComputeInUse"
        )
    compute.compute_type, compute.properties, compute.sealed_credentials = body.type, properties, sealed
    session.flush()
    return _target(compute), False


def delete_target(session: Session, account: AccountRef, *, name: str) -> None:
    """Detach a target no service uses; ``local`` is built in (409)."""
    if _is_local(name):
        raise Conflict("compute 'local' is built in: it cannot be detached", code="BuiltInCompute")
    compute = _find(session, account, name)
    if compute is None:
        raise NotFound(f"compute '{name}' was not found in this account", code="ComputeNotFound")
    in_use = _in_use(session, account, name)
    if in_use:
        raise Conflict(f"compute '{name}' runs {in_use} service(s): delete them first", code="ComputeInUse")
    session.delete(compute)
    session.flush()
