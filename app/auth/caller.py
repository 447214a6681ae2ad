"""Who is calling, with the roles they hold, and the one check every route makes."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.roles import Permission, Role, scope_contains
from app.auth.tokens import VerifiedToken
from app.errors import Forbidden
from app.orm import RoleAssignment


@dataclass(frozen=True)
class Grant:
    role: Role
    scope: str  # normalised


@dataclass(frozen=True)
class Caller:
    issuer: str
    subject: str
    grants: tuple[Grant, ...]
    expires_at: float | None = None  # the token's exp (seconds since the epoch)

    @property
    def owner_key(self) -> str:
        """A stable name for this caller, e.g. to scope idempotency keys."""
        return f"{self.issuer} {self.subject}"

    def can(self, permission: Permission, scope: str) -> bool:
        return any(
            permission in grant.role.permissions and scope_contains(grant.scope, scope)
            for grant in self.grants
        )

    def require(self, permission: Permission, scope: str) -> None:
        """Forbidden unless one of the caller's roles grants ``permission`` on ``scope``."""
        if not self.can(permission, scope):
            raise Forbidden(
                f"the caller has no role that allows {permission.value} access on {scope}",
                code="AuthorizationFailed",
            )


def load_caller(session: Session, token: VerifiedToken) -> Caller:
    """The caller behind a verified token, with the role assignments stored for them."""
    rows = session.execute(
        select(RoleAssignment.role, RoleAssignment.scope).where(
            RoleAssignment.issuer == token.issuer, RoleAssignment.subject == token.subject
        )
    ).all()
    grants = tuple(Grant(role=Role(role), scope=scope) for role, scope in rows)
    exp = token.claims.get("exp")
    return Caller(issuer=token.issuer, subject=token.subject, grants=grants,
                  expires_at=float(exp) if isinstance(exp, int | float) else None)
