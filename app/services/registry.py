"""Pulling images: the read side of the OCI Distribution API over the image layout, and its tokens.

Repositories are named ``<account id>/<image name>``. Pulling one needs read access to that
account, decided by the roles every API route checks (``Caller.can``). A client proves who
it is with either

- the service's own access token (``POST /oauth2/token``), or
- a registry token from ``GET /v2/token`` (Docker's token protocol: HTTP Basic with a
  service principal's id and secret, one ``scope`` per repository). It lists the
  repositories granted when it was issued and has an audience of its own, so it is no
  API token. Roles are checked again on every pull: revoking one stops pulls at once.

Failures are ``RegistryError``s, rendered in the spec's shape
``{"errors": [{"code", "message", "detail"}]}``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jose import JWTError, jwt
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.caller import Caller, load_caller
from app.auth.roles import Permission, account_scope
from app.auth.tokens import ALGORITHM, TokenVerifier, TrustedIssuerKeys, VerifiedToken
from app.config import Settings
from app.context import ServiceContext
from app.errors import ServiceError, Unauthorized
from app.orm import Account, SigningKey
from app.services.images import drop_orphan_tags
from app.services.principals import authenticate_client
from app.storage.oci_layout import (
    CollectedGarbage,
    Descriptor,
    OciLayout,
    check_digest,
    check_repository,
    check_tag,
)

log = logging.getLogger("mms.registry")

__all__ = [
    "RegistryError",
    "Target",
    "challenge",
    "get_blob",
    "get_manifest",
    "image_layout",
    "issue_pull_token",
    "list_tags",
    "parse_target",
    "require_login",
    "require_pull",
    "resolve_manifest",
]

MAX_TAGS_PAGE = 1000
MAX_SCOPES = 32  # repositories one token request may ask for; more are dropped
_STATUS = {
    "BLOB_UNKNOWN": 404,
    "MANIFEST_UNKNOWN": 404,
    "NAME_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "DIGEST_INVALID": 400,
    "TAG_INVALID": 400,
    "PAGINATION_NUMBER_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "UNKNOWN": 500,
}
_TARGET = re.compile(r"(?P<name>.*)/(?:manifests/(?P<reference>[^/]+)|blobs/(?P<digest>[^/]+)|tags/list)")


class RegistryError(ServiceError):
    """A failure of a /v2 route, in the distribution spec's error shape and status."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        detail: Any = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.status_code = status_code or _STATUS[code]
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"errors": [{"code": self.code, "message": self.message, "detail": self.detail}]}


def image_layout(settings: Settings) -> OciLayout:
    """The layout under ``<data dir>/images`` (nothing is created until something is written)."""
    return _layout_at(settings.image_store_dir.absolute())


def collect_garbage(
    session: Session, settings: Settings, *, grace_seconds: float | None = None
) -> CollectedGarbage | None:
    """Untag images whose record is gone, then remove what no tag of the embedded store
    reaches, each only once nothing touched it for the grace period
    (MMS_IMAGE_GC_GRACE_SECONDS); None when images live in a registry."""
    layout = embedded_layout(settings)
    if layout is None:
        return None
    grace = settings.image_gc_grace_seconds if grace_seconds is None else grace_seconds
    orphans = drop_orphan_tags(session, layout, grace_seconds=grace)
    done = layout.collect_garbage(grace_seconds=grace)
    done.tags = len(orphans)
    log.info(
        "registry.garbage_collected",
        extra={
            "blobs": done.blobs,
            "bytes": done.bytes,
            "links": done.links,
            "tags": done.tags,
            "staging_files": done.staging_files,
        },
    )
    return done


def embedded_layout(settings: Settings) -> OciLayout | None:
    """The embedded store, or None when images live in a registry (MMS_REGISTRY)."""
    return image_layout(settings) if settings.is_embedded_registry else None


@lru_cache(maxsize=16)
def _layout_at(root: Path) -> OciLayout:
    return OciLayout(root)  # one per root, so its index cache is shared by every request


# -- routes and names ---------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a /v2/<name>/... path asks for: ``kind`` is manifests, blobs or tags."""

    kind: str
    repository: str
    reference: str = ""


def parse_target(path: str) -> Target:
    """The repository and object a /v2 path names; 404 for a path that is no pull route."""
    match = _TARGET.fullmatch(path)
    if match is None:
        raise RegistryError(
            "UNSUPPORTED",
            f"/v2/{path} is not a route of this registry; it serves "
            "/v2/<name>/manifests/<reference>, /v2/<name>/blobs/<digest> and /v2/<name>/tags/list",
            status_code=404,
        )
    if match["reference"] is not None:
        return Target("manifests", match["name"], match["reference"])
    if match["digest"] is not None:
        return Target("blobs", match["name"], match["digest"])
    return Target("tags", match["name"])


def _valid_repository(name: str) -> bool:
    try:
        check_repository(name)
    except ValueError:
        return False
    return True


def _account_id(repository: str) -> uuid.UUID | None:
    """The account a repository belongs to: its first component, a UUID in canonical form."""
    first = repository.split("/", 1)[0]
    try:
        parsed = uuid.UUID(first)
    except ValueError:
        return None
    return parsed if str(parsed) == first else None


def _may_read(session: Session, caller: Caller, repository: str) -> bool:
    """Whether the caller's roles allow reading the account that owns ``repository``."""
    account_id = _account_id(repository)
    account = session.get(Account, account_id) if account_id else None
    if account is None:
        return False
    scope = account_scope(account.subscription_id, account.resource_group, account.name)
    return caller.can(Permission.READ, scope)


# -- authentication -----------------------------------------------------------------------


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
) -> RegistryError:
    return RegistryError(
        "UNAUTHORIZED",
        message,
        headers={"WWW-Authenticate": challenge(settings, repository=repository, error=error)},
    )


class _OwnPublicKeys:
    """Our public keys by kid, read through the request's session. A kid is the key's
    RFC 7638 thumbprint, so a key found once stays right for good."""

    _known: dict[str, dict[str, Any]] = {}

    def __init__(self, session: Session) -> None:
        self._session = session

    def public_key(self, kid: str, *, refresh: bool = True) -> dict[str, Any] | None:
        if kid not in self._known and refresh:
            row = self._session.scalar(select(SigningKey.public_jwk).where(SigningKey.kid == kid))
            if row is None:
                return None
            self._known[kid] = json.loads(row)
        return self._known.get(kid)


@dataclass(frozen=True)
class _Puller:
    caller: Caller
    granted: frozenset[str] | None  # a registry token's repositories; None: an access token


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
            keys = _OwnPublicKeys(session)
            own = TrustedIssuerKeys(settings.issuer, registry_audience, keys)
            verifier = TokenVerifier([own], settings.clock_skew_seconds)
            verified = verifier.verify(token)
            granted: frozenset[str] | None = _granted_repositories(verified.claims)
        else:
            verified = context.verifier.verify(token)
            granted = None
    except Unauthorized as exc:
        raise _unauthorized(settings, repository, exc.message, error="invalid_token") from None
    return _Puller(load_caller(session, verified), granted)


def _granted_repositories(claims: dict[str, Any]) -> frozenset[str]:
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
    valid = _valid_repository(repository)
    puller = _authenticate(
        session, context=context, authorization=authorization, repository=repository if valid else None
    )
    if not valid:
        raise RegistryError(
            "NAME_INVALID",
            "invalid repository name: lower-case letters and digits separated by '.', '_', '__', '-' or '/'",
            detail={"name": repository[:300]},
        )
    if not _may_read(session, puller.caller, repository):
        raise RegistryError(
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
            if kind == "repository" and wants_pull and _valid_repository(name) and name not in names:
                names.append(name)
    return names[:MAX_SCOPES]


def issue_pull_token(
    session: Session,
    *,
    context: ServiceContext,
    client_id: str,
    client_secret: str,
    scopes: list[str],
    service: str | None,
) -> dict[str, Any]:
    """A registry token for a service principal, granting pull on the requested repositories
    it may read; the others are silently left out, as Docker's token protocol asks."""
    settings = context.settings
    if service is not None and service != settings.issuer:
        message = f"this token service issues tokens for service '{settings.issuer}' only"
        raise RegistryError("UNSUPPORTED", message, status_code=400)
    principal = authenticate_client(session, client_id=client_id, client_secret=client_secret)
    if principal is None:
        raise RegistryError(
            "UNAUTHORIZED",
            "the client id or secret is wrong",
            headers={"WWW-Authenticate": f'Basic realm="{settings.resolved_public_url}/v2/token"'},
        )
    # The principal's roles, exactly as its own access token would carry them.
    identity = VerifiedToken(issuer=settings.issuer, subject=principal.client_id, claims={})
    caller = load_caller(session, identity)
    granted = [name for name in _requested_repositories(scopes) if _may_read(session, caller, name)]
    now, ttl = int(time.time()), settings.token_ttl_seconds
    claims = {
        "iss": settings.issuer,
        "aud": _registry_audience(settings),
        "sub": principal.client_id,
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "access": [{"type": "repository", "name": name, "actions": ["pull"]} for name in granted],
    }
    key = context.signing_key()
    token = jwt.encode(claims, key.pem, algorithm=ALGORITHM, headers={"kid": key.kid})
    log.info("registry.token_issued", extra={"clientId": principal.client_id, "repositories": granted})
    issued_at = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued_at}


# -- reading the layout -------------------------------------------------------------------


def resolve_manifest(layout: OciLayout, *, repository: str, reference: str) -> Descriptor:
    """The manifest a tag or digest names in ``repository``; 400 or 404 otherwise."""
    try:
        if ":" in reference:
            check_digest(reference)
        else:
            check_tag(reference)
    except ValueError as exc:
        code = "DIGEST_INVALID" if ":" in reference else "TAG_INVALID"
        raise RegistryError(code, str(exc)[:300], detail={"reference": reference[:300]}) from None
    descriptor = layout.resolve(repository, reference)
    if descriptor is None:
        raise RegistryError(
            "MANIFEST_UNKNOWN",
            f"manifest {reference} is not in repository {repository}",
            detail={"name": repository, "reference": reference},
        )
    return descriptor


def get_manifest(layout: OciLayout, *, repository: str, reference: str) -> tuple[Descriptor, bytes]:
    """The manifest's descriptor and content."""
    descriptor = resolve_manifest(layout, repository=repository, reference=reference)
    try:
        with layout.open_blob(descriptor.digest) as handle:
            return descriptor, handle.read()
    except FileNotFoundError:
        raise RegistryError("MANIFEST_UNKNOWN", f"manifest {reference} is not in repository {repository}") from None


def get_blob(layout: OciLayout, *, repository: str, digest: str) -> tuple[Path, int]:
    """The file and size of a blob ``repository`` may serve; 400 or 404 otherwise."""
    try:
        check_digest(digest)
    except ValueError as exc:
        raise RegistryError("DIGEST_INVALID", str(exc)[:300], detail={"digest": digest[:300]}) from None
    size = layout.has_blob(digest) if layout.is_linked(repository, digest) else None
    if size is None:
        message = f"blob {digest} is not in repository {repository}"
        raise RegistryError("BLOB_UNKNOWN", message, detail={"digest": digest})
    return layout.blob_path(digest), size


def list_tags(
    layout: OciLayout, *, repository: str, n: str | None, last: str | None
) -> tuple[list[str], int, str | None]:
    """A page of tags in lexical order after ``last``: the tags, the page size, and the
    ``last`` of the next page (None on the final page). Pages hold at most MAX_TAGS_PAGE."""
    limit = MAX_TAGS_PAGE
    if n is not None:
        if not n.isascii() or not n.isdigit():
            message = "n must be a whole number of at least 0"
            raise RegistryError("PAGINATION_NUMBER_INVALID", message, detail={"n": n[:50]})
        # A registry may answer fewer than n; the Link header leads to the rest.
        limit = MAX_TAGS_PAGE if len(n) > 6 else min(int(n), MAX_TAGS_PAGE)
    tags = layout.tags(repository)
    if not tags and not layout.has_repository(repository):
        message = f"repository {repository} is not known"
        raise RegistryError("NAME_UNKNOWN", message, detail={"name": repository})
    if last:
        tags = [tag for tag in tags if tag > last]
    page = tags[:limit]
    more = limit > 0 and len(tags) > limit
    return page, limit, page[-1] if more else None
