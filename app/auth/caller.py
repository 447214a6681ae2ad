"""Who is calling, with the roles they hold, and the one check every route makes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

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

    def can(self, permission: Permission, scope: str) -> bool:
        return any(permission in grant.role.permissions and scope_contains(grant.scope, scope) for grant in self.grants)

    def require(self, permission: Permission, scope: str) -> None:
        """Forbidden unless one of the caller's roles grants ``permission`` on ``scope``."""
        if not self.can(permission, scope):
            raise Forbidden(
                f"the caller has no role that allows {permission.value} access on {scope}",
                code="AuthorizationFailed",
            )


class GrantsCache:
    """Each subject's role grants, kept ``ttl`` seconds: a dashboard polling every second costs
    one role query per ``ttl``, and a revoked role stops working within ``ttl``."""

    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, str], tuple[float, tuple[Grant, ...]]] = {}
        self._lock = threading.Lock()

    def get(self, issuer: str, subject: str) -> tuple[Grant, ...] | None:
        entry = self._entries.get((issuer, subject))
        if entry is None or time.monotonic() - entry[0] > self.ttl:
            return None
        return entry[1]

    def put(self, issuer: str, subject: str, grants: tuple[Grant, ...]) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()  # rare: start over rather than track ages
            self._entries[(issuer, subject)] = (time.monotonic(), grants)


def grants_of(session: Session, callers: Iterable[Caller]) -> dict[tuple[str, str], tuple[Grant, ...]]:
    """The role grants stored now for each caller's (issuer, subject): a query per issuer and 500 subjects."""
    found: dict[tuple[str, str], list[Grant]] = {(caller.issuer, caller.subject): [] for caller in callers}
    by_issuer: dict[str, list[str]] = {}
    for issuer, subject in sorted(found):
        by_issuer.setdefault(issuer, []).append(subject)
    for issuer, subjects in by_issuer.items():
        for start in range(0, len(subjects), 500):
            rows = session.execute(  # (issuer, subject) is the index's order
                select(RoleAssignment.subject, RoleAssignment.role, RoleAssignment.scope).where(
                    RoleAssignment.issuer == issuer, RoleAssignment.subject.in_(subjects[start : start + 500])
                )
            ).all()
            for subject, role, scope in rows:
                found[(issuer, subject)].append(Grant(role=Role(role), scope=scope))
    return {key: tuple(grants) for key, grants in found.items()}


def with_grants(caller: Caller, grants: dict[tuple[str, str], tuple[Grant, ...]]) -> Caller:
    """The same caller holding the grants just read (none when all were removed)."""
    return replace(caller, grants=grants.get((caller.issuer, caller.subject), ()))


def caller_for(token: VerifiedToken, grants: tuple[Grant, ...]) -> Caller:
    exp = token.claims.get("exp")
    return Caller(
        issuer=token.issuer,
        subject=token.subject,
        grants=grants,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
    )


def load_caller(session: Session, token: VerifiedToken, cache: GrantsCache | None = None) -> Caller:
    """The caller behind a verified token, with the role assignments stored for them."""
    if cache is not None and (grants := cache.get(token.issuer, token.subject)) is not None:
        return caller_for(token, grants)
    rows = session.execute(
        select(RoleAssignment.role, RoleAssignment.scope).where(
            RoleAssignment.issuer == token.issuer, RoleAssignment.subject == token.subject
        )
    ).all()
    grants = tuple(Grant(role=Role(role), scope=scope) for role, scope in rows)
    if cache is not None:
        cache.put(token.issuer, token.subject, grants)
    return caller_for(token, grants)
