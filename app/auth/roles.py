"""Roles, the permissions they grant, and scopes they are granted on.

A scope is one of ``/``, ``/subscriptions/{s}``, ``/subscriptions/{s}/resourceGroups/{rg}``
or ``/subscriptions/{s}/resourceGroups/{rg}/accounts/{a}``; a role granted on a scope
holds for everything below it. Scopes compare case-insensitively, as ARM's do.
"""

from __future__ import annotations

import enum

from app.errors import BadRequest


class Permission(enum.Enum):
    READ = "read"
    WRITE = "write"
    # Role assignments (service principals) only: as in Azure, a Contributor creates and
    # deletes resources, accounts included, but cannot grant access.
    MANAGE = "manage"


class Role(enum.StrEnum):
    READER = "Reader"
    CONTRIBUTOR = "Contributor"
    OWNER = "Owner"

    @property
    def permissions(self) -> frozenset[Permission]:
        return _ROLE_PERMISSIONS[self]


_ROLE_PERMISSIONS = {
    Role.READER: frozenset({Permission.READ}),
    Role.CONTRIBUTOR: frozenset({Permission.READ, Permission.WRITE}),
    Role.OWNER: frozenset({Permission.READ, Permission.WRITE, Permission.MANAGE}),
}

_SCOPE_KEYWORDS = ("subscriptions", "resourcegroups", "accounts")
_SCOPE_HELP = (
    "a scope is /subscriptions/{id}, /subscriptions/{id}/resourceGroups/{name} "
    "or /subscriptions/{id}/resourceGroups/{name}/accounts/{name}"
)


def parse_role(value: str) -> Role:
    """The role named by ``value`` (any case), or a 400 listing the roles."""
    for role in Role:
        if role.value.lower() == value.strip().lower():
            return role
    raise BadRequest(
        f"role '{value}' is not a role; use one of {', '.join(r.value for r in Role)}",
        code="InvalidRole",
    )


def normalise_scope(scope: str) -> str:
    """The canonical, lower-cased form of a scope, or a 400 that shows the accepted forms."""
    segments = [s for s in scope.strip().lower().split("/") if s]
    # ARM ids carry a provider segment pair before the account; it adds nothing here.
    if len(segments) >= 6 and segments[4] == "providers":
        segments = segments[:4] + segments[6:]
    if len(segments) % 2 or len(segments) > 2 * len(_SCOPE_KEYWORDS):
        raise BadRequest(f"scope '{scope}' is not valid: {_SCOPE_HELP}", code="InvalidScope")
    for index, keyword in enumerate(segments[0::2]):
        if keyword != _SCOPE_KEYWORDS[index]:
            raise BadRequest(f"scope '{scope}' is not valid: {_SCOPE_HELP}", code="InvalidScope")
    return "/" + "/".join(segments)


def scope_contains(outer: str, inner: str) -> bool:
    """Whether a role on normalised scope ``outer`` reaches normalised scope ``inner``."""
    if outer == "/":
        return True
    return inner == outer or inner.startswith(outer + "/")


def account_scope(subscription_id: str, resource_group: str, account_name: str | None = None) -> str:
    """The normalised scope of a resource group, or of an account in it."""
    scope = f"/subscriptions/{subscription_id}/resourcegroups/{resource_group}"
    if account_name is not None:
        scope += f"/accounts/{account_name}"
    return scope.lower()
