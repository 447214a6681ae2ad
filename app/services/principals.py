"""Service principals: created by Owners, exchanged for tokens at the token endpoint."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import datetime

from sqlalchemy import or_, select, true, tuple_
from sqlalchemy.orm import Session, selectinload

from app.auth.caller import Caller
from app.auth.roles import Permission, Role, normalise_scope, parse_role
from app.errors import Conflict, NotFound
from app.orm import RoleAssignment, ServicePrincipal
from app.services.paging import decode_token, encode_token, invalid_skip_token, page_size


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


def list_principals_as(
    session: Session, caller: Caller, *, count: int | None, skip_token: str | None
) -> tuple[list[ServicePrincipal], str | None]:
    """A page of the principals whose every scope the caller owns, oldest first, and the token of
    the next page. Chosen by the database (the caller's Owner scopes against each role
    assignment's), so a page costs its rows, however many principals other tenants hold."""
    limit = page_size(count)
    owned = [grant.scope for grant in caller.grants if Permission.MANAGE in grant.role.permissions]
    if not owned:
        return [], None
    if "/" in owned:
        covered = true()
    else:  # scope_contains in SQL: the scope itself or one below it
        covered = or_(
            *(
                or_(RoleAssignment.scope == scope, RoleAssignment.scope.startswith(scope + "/", autoescape=True))
                for scope in owned
            )
        )
    assignments = select(RoleAssignment.id).where(RoleAssignment.principal_id == ServicePrincipal.id)
    query = select(ServicePrincipal).where(assignments.exists(), ~assignments.where(~covered).exists())
    query = query.options(selectinload(ServicePrincipal.assignments))  # each row's roles: one query a page
    position = decode_token(skip_token, fields={"c": str, "k": str})
    if position is not None:
        try:
            created_at = datetime.fromisoformat(position["c"])
        except ValueError:
            raise invalid_skip_token() from None
        query = query.where(
            tuple_(ServicePrincipal.created_at, ServicePrincipal.client_id) > (created_at, position["k"])
        )
    order = (ServicePrincipal.created_at, ServicePrincipal.client_id)
    rows = list(session.scalars(query.order_by(*order).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_token({"c": last.created_at.isoformat(), "k": last.client_id})


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
