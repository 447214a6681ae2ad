"""Who may pull from the image store's ``/v2/`` API, and the registry tokens it issues.

A client proves who it is with either

- the service's own access token (``POST /oauth2/token``), or
- a registry token from ``GET /v2/token`` (Docker's token protocol: HTTP Basic with a
  service principal's id and secret, one ``scope`` per repository). It lists the
  repositories granted when it was issued and has an audience of its own, so it is no
  API token. Roles are checked again on every pull: revoking one stops pulls at once.

Repositories are named ``<account id>/<image name>`` (``app.image_store.naming``); pulling
one needs read access to that account, decided by the roles every API route checks
(``Caller.can``). Failures are ``DistributionError``s, which a registry client understands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jose import JWTError, jwt
from sqlalchemy.orm import Session

from app.auth.basic import basic_credentials
from app.auth.caller import Caller, load_caller
from app.auth.roles import Permission, account_scope
from app.auth.tokens import TokenVerifier, TrustedIssuerKeys, VerifiedToken, sign_token
from app.config import Settings
from app.errors import DistributionError, Unauthorized
from app.image_store.naming import is_valid_repository, repository_account_id
from app.orm import Account
from app.services.principals import authenticate_client

if TYPE_CHECKING:
    from app.context import ServiceContext

log = logging.getLogger("mms.registry")

__all__ = ["MAX_SCOPES", "challenge", "engine_pull_token", "issue_pull_token", "require_login", "require_pull"]

MAX_SCOPES = 32  # repositories one token request may ask for; more are dropped
# Marks a token the service made for its own Docker engine (the smoke test's pull): only
# the service signs it, so the token itself is the grant, for the repositories it lists.
_ENGINE_CLAIM = "mms:engine"
_ENGINE_SUBJECT = "mms-worker"
_PUBLISHED_BASES = "mms/"  # the published and imported base images: no account owns them


def challenge(settings: Settings, *, repository: str | None = None, error: str | None = None) -> str:
    """The ``WWW-Authenticate`` value that sends a client to the token endpoint."""
    fields = {"realm": f"{settings.resolved_public_url}/v2/token", "service": settings.issuer}
    if repository:
        fields["scope"] = f"repository:{repository}:pull"
    if error:
        fields["error"] = error
    return "Bearer " + ",".join(f'{k}="{v.replace(chr(34), "")}"' for k, v in fields.items())


def _registry_audience(settings: Settings) -> str:
    # Not MMS_AUDIENCE: a pull token handed to docker must not also work on /api.
    return f"{settings.audience}/v2"


def _unauthorized(
    settings: Settings, repository: str | None, message: str, *, error: str | None = None
) -> DistributionError:
    return DistributionError(
        "UNAUTHORIZED",
        message,
        headers={"WWW-Authenticate": challenge(settings, repository=repository, error=error)},
    )


def _account_exists(session: Session, repository: str) -> bool:
    account_id = repository_account_id(repository)
    return account_id is not None and session.get(Account, account_id) is not None


def _may_read(session: Session, caller: Caller, repository: str) -> bool:
    """Whether the caller's roles allow reading the account that owns ``repository``; a
    published base (``mms/``), which every account's builds may name as their FROM, any
    caller with a role that reads some account may pull too."""
    if repository.startswith(_PUBLISHED_BASES):
        return any(Permission.READ in grant.role.permissions for grant in caller.grants)
    account_id = repository_account_id(repository)
    account = session.get(Account, account_id) if account_id else None
    if account is None:
        return False
    scope = account_scope(account.subscription_id, account.resource_group, account.name)
    return caller.can(Permission.READ, scope)


# -- checking a pull ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Puller:
    caller: Caller
    granted: frozenset[str] | None  # a registry token's repositories; None: an access token
    engine: bool = False  # the service's own engine: ``granted`` needs no role behind it


def _authenticate(
    session: Session, *, context: ServiceContext, authorization: str | None, repository: str | None
) -> _Puller:
    settings = context.settings
    if not authorization:
        raise _unauthorized(settings, repository, "authentication required: get a token from /v2/token")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(settings, repository, "send 'Authorization: Bearer <token>' with a token from /v2/token")
    try:
        audience = jwt.get_unverified_claims(token).get("aud")
    except (JWTError, AttributeError):
        audience = None
    registry_audience = _registry_audience(settings)
    try:
        if audience == registry_audience:
            # The same keys (and key cache) as the service's access tokens, another audience.
            own = TrustedIssuerKeys(settings.issuer, registry_audience, context.own_keys)
            verified = TokenVerifier([own], settings.clock_skew_seconds).verify(token)
            granted: frozenset[str] | None = _granted_repositories(verified.claims)
            if verified.claims.get(_ENGINE_CLAIM) is True and verified.subject == _ENGINE_SUBJECT:
                return _Puller(Caller(settings.issuer, _ENGINE_SUBJECT, grants=()), granted, engine=True)
        else:
            verified = context.verifier.verify(token)
            granted = None
    except Unauthorized as exc:
        raise _unauthorized(settings, repository, exc.message, error="invalid_token") from None
    return _Puller(load_caller(session, verified), granted)


def _granted_repositories(claims: Mapping[str, Any]) -> frozenset[str]:
    access = claims.get("access")
    return frozenset(
        entry["name"]
        for entry in (access if isinstance(access, list) else [])
        if isinstance(entry, dict)
        and entry.get("type") == "repository"
        and isinstance(entry.get("name"), str)
        and isinstance(entry.get("actions"), list)
        and "pull" in entry["actions"]
    )


def require_login(session: Session, *, context: ServiceContext, authorization: str | None) -> None:
    """Pass any valid token (the ``GET /v2/`` check); 401 with a challenge otherwise."""
    _authenticate(session, context=context, authorization=authorization, repository=None)


def require_pull(session: Session, *, context: ServiceContext, authorization: str | None, repository: str) -> None:
    """Pass if the caller may pull ``repository``: 401, 400 NAME_INVALID or 403 otherwise.

    Authorised before anything is looked up, so no answer says what another tenant holds.
    """
    valid = is_valid_repository(repository)
    puller = _authenticate(
        session, context=context, authorization=authorization, repository=repository if valid else None
    )
    if not valid:
        raise DistributionError(
            "NAME_INVALID",
            "invalid repository name: lower-case letters and digits separated by '.', '_', '__', '-' or '/'",
            detail={"name": repository[:300]},
        )
    if puller.engine:
        # The service's own engine: pull only, the repositories its token lists only, each an
        # account's or a published base (``mms/``: the docker builder's FROM on the embedded default).
        published = repository.startswith(_PUBLISHED_BASES)
        if repository not in puller.granted or not (published or _account_exists(session, repository)):
            raise DistributionError(
                "DENIED", f"the token does not grant pull on {repository}", detail={"name": repository}
            )
        return
    if not _may_read(session, puller.caller, repository):
        raise DistributionError(
            "DENIED",
            f"the caller may not pull {repository}: it needs a role that reads the account it belongs to",
            detail={"name": repository},
        )
    if puller.granted is not None and repository not in puller.granted:
        # The token was issued for other repositories: the client should fetch one for this.
        message = f"the token does not grant pull on {repository}"
        raise _unauthorized(context.settings, repository, message, error="insufficient_scope")


# -- the token endpoint -------------------------------------------------------------------


def _requested_repositories(scopes: list[str]) -> list[str]:
    """Repositories asked for pull, from ``repository:<name>:<actions>`` scopes (others ignored)."""
    names: list[str] = []
    for value in scopes:
        for scope in value.split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wants_pull = {"pull", "*"} & set(actions.split(","))
            if kind == "repository" and wants_pull and is_valid_repository(name) and name not in names:
                names.append(name)
    return names[:MAX_SCOPES]


def issue_pull_token(
    session: Session,
    *,
    context: ServiceContext,
    authorization: str | None,
    scopes: list[str],
    service: str | None,
) -> dict[str, Any]:
    """A registry token for the service principal whose id and secret ``authorization``
    carries (HTTP Basic), granting pull on the requested repositories it may read; the
    others are silently left out, as Docker's token protocol asks."""
    settings = context.settings
    basic_challenge = {"WWW-Authenticate": f'Basic realm="{settings.resolved_public_url}/v2/token"'}
    try:
        client_id, client_secret = basic_credentials(authorization) or ("", "")
    except ValueError:
        client_id = client_secret = ""
    if not client_id or not client_secret:
        raise DistributionError(
            "UNAUTHORIZED",
            "send the service principal's clientId and clientSecret with HTTP Basic authentication",
            headers=basic_challenge,
        )
    if service is not None and service != settings.issuer:
        message = f"this token service issues tokens for service '{settings.issuer}' only"
        raise DistributionError("UNSUPPORTED", message, status_code=400)
    principal = authenticate_client(session, client_id=client_id, client_secret=client_secret)
    if principal is None:
        raise DistributionError("UNAUTHORIZED", "the client id or secret is wrong", headers=basic_challenge)
    # The principal's roles, exactly as its own access token would carry them.
    identity = VerifiedToken(issuer=settings.issuer, subject=principal.client_id, claims={})
    caller = load_caller(session, identity)
    granted = [name for name in _requested_repositories(scopes) if _may_read(session, caller, name)]
    now = int(time.time())
    ttl = settings.token_ttl_seconds
    token = sign_token(
        context.signing_key(),
        issuer=settings.issuer,
        audience=_registry_audience(settings),
        subject=principal.client_id,
        ttl_seconds=ttl,
        issued_at=now,
        claims={"access": [{"type": "repository", "name": name, "actions": ["pull"]} for name in granted]},
    )
    log.info("registry.token_issued", extra={"clientId": principal.client_id, "repositories": granted})
    issued_at = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued_at}


def engine_pull_token(context: ServiceContext, repository: str, *, ttl_seconds: int) -> str:
    """A registry token for the service's own Docker engine to pull ``repository`` (one
    built image, for its smoke test) from the image store: pull only, that repository only,
    short-lived. No principal stands behind it, so none need exist on the embedded default."""
    settings = context.settings
    return sign_token(
        context.signing_key(),
        issuer=settings.issuer,
        audience=_registry_audience(settings),
        subject=_ENGINE_SUBJECT,
        ttl_seconds=ttl_seconds,
        claims={_ENGINE_CLAIM: True, "access": [{"type": "repository", "name": repository, "actions": ["pull"]}]},
    )
