"""Service principals: created by Owners, exchanged for tokens at the token endpoint."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.caller import Caller
from app.auth.roles import Permission, Role, normalise_scope, parse_role
from app.errors import Conflict, NotFound
from app.orm import RoleAssignment, ServicePrincipal


def _hash_secret(secret: str) -> str:
    # Secrets are 256 random bits, not passwords: a fast hash is enough and keeps the
    # token endpoint quick; a slow KDF only helps against guessable secrets.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_service_principal(
    session: Session,
    *,
    issuer: str,
    display_name: str,
    role: str,
    scope: str,
    created_by: str | None,
) -> tuple[ServicePrincipal, str]:
    """A new principal with one role on one scope, and its secret (shown only now)."""
    secret = secrets.token_urlsafe(32)
    principal = ServicePrincipal(
        client_id=str(uuid.uuid4()),
        display_name=display_name,
        secret_hash=_hash_secret(secret),
        created_by=created_by,
    )
    principal.assignments.append(
        RoleAssignment(
            issuer=issuer,
            subject=principal.client_id,
            role=parse_role(role).value,
            scope=normalise_scope(scope),
        )
    )
    session.add(principal)
    session.flush()
    return principal, secret


def create_principal_as(
    session: Session, caller: Caller, *, issuer: str, display_name: str, role: str, scope: str
) -> tuple[ServicePrincipal, str]:
    """Create a principal on behalf of ``caller``, who must be Owner of the scope."""
    caller.require(Permission.MANAGE, normalise_scope(scope))
    return create_service_principal(
        session,
        issuer=issuer,
        display_name=display_name,
        role=role,
        scope=scope,
        created_by=caller.subject,
    )


def _manageable(caller: Caller, principal: ServicePrincipal) -> bool:
    return all(caller.can(Permission.MANAGE, a.scope) for a in principal.assignments)


def list_principals_as(session: Session, caller: Caller) -> list[ServicePrincipal]:
    """The principals whose every scope the caller owns."""
    principals = session.scalars(select(ServicePrincipal).order_by(ServicePrincipal.created_at))
    return [p for p in principals if _manageable(caller, p)]


def get_principal_as(session: Session, caller: Caller, *, client_id: str) -> ServicePrincipal:
    """One principal the caller owns the scope of; 404 otherwise, so ids do not leak."""
    principal = session.scalars(select(ServicePrincipal).where(ServicePrincipal.client_id == client_id)).first()
    if principal is None or not _manageable(caller, principal):
        raise NotFound(f"service principal '{client_id}' was not found", code="PrincipalNotFound")
    return principal


def delete_principal_as(session: Session, caller: Caller, *, client_id: str) -> None:
    """Delete a principal: its tokens lose their roles within the grants cache's ttl, its streams within a recheck."""
    session.delete(get_principal_as(session, caller, client_id=client_id))
    session.flush()


def authenticate_client(session: Session, *, client_id: str, client_secret: str) -> ServicePrincipal | None:
    """The principal if the id and secret match, else None (constant time on the secret)."""
    principal = session.scalars(select(ServicePrincipal).where(ServicePrincipal.client_id == client_id)).first()
    expected = principal.secret_hash if principal else _hash_secret("no such principal")
    matches = hmac.compare_digest(expected, _hash_secret(client_secret))
    return principal if principal is not None and matches else None


def owner_exists(session: Session) -> bool:
    return (
        session.scalars(select(RoleAssignment.id).where(RoleAssignment.role == Role.OWNER.value).limit(1)).first()
        is not None
    )


def bootstrap_owner(session: Session, *, issuer: str) -> tuple[ServicePrincipal, str]:
    """The first Owner, on every scope; refused once any Owner exists."""
    if owner_exists(session):
        raise Conflict(
            "an Owner already exists; sign in as it and create more principals with "
            "POST /api/servicePrincipals (role and scope of your choice)",
            code="OwnerExists",
        )
    return create_service_principal(
        session,
        issuer=issuer,
        display_name="bootstrap-owner",
        role=Role.OWNER.value,
        scope="/",
        created_by=None,
    )


def grant_role(session: Session, *, issuer: str, subject: str, role: str, scope: str) -> RoleAssignment:
    """Give an external principal (an AAD object id, say) a role on a scope."""
    assignment = RoleAssignment(
        issuer=issuer, subject=subject, role=parse_role(role).value, scope=normalise_scope(scope)
    )
    session.add(assignment)
    session.flush()
    return assignment


__all__ = [
    "authenticate_client",
    "bootstrap_owner",
    "create_principal_as",
    "create_service_principal",
    "delete_principal_as",
    "get_principal_as",
    "grant_role",
    "list_principals_as",
    "owner_exists",
]
