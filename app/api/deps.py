"""Dependencies every route shares: the session, the caller, the account in the path."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator
from sqlalchemy.orm import Session
from starlette.types import Scope

from app import names
from app.api.event_stream import EventHub
from app.api.routing import RequestSession, end_with_endpoint, ends_its_session
from app.auth.caller import Caller, caller_for, load_caller
from app.auth.roles import Permission, account_scope
from app.auth.tokens import KeyNotAtHand, TokenVerifier, VerifiedToken
from app.context import ServiceContext
from app.errors import BadRequest, Unauthorized
from app.reads import Reads
from app.schemas.common import unstorable
from app.services.accounts import AccountPath, AccountRef, find_account_ref
from app.writes import Writes

CURRENT_API_VERSION = "2017-09-01-preview"
SUPPORTED_API_VERSIONS = (CURRENT_API_VERSION,)

# Trivial dependencies are async: FastAPI runs each sync one on the thread pool, a hop apiece.


async def get_context(request: Request) -> ServiceContext:
    return request.app.state.context


ContextDep = Annotated[ServiceContext, Depends(get_context)]


async def get_event_hub(request: Request) -> EventHub:
    return request.app.state.event_hub


EventHubDep = Annotated[EventHub, Depends(get_event_hub)]


_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def get_session(request: Request) -> Session:
    """The request's session: it commits when the endpoint returns, before the response is sent,
    and rolls back when it raises (ended by the route, in the endpoint's own trip to the thread
    pool: app.api.routing).

    A GET only reads: its session is read-only (on SQLite it neither waits for nor blocks a
    writer). Making a session does no I/O, so this runs on the event loop.
    """
    if not ends_its_session(request.scope.get("route")):  # a router made without route_class=ApiRoute, say
        raise RuntimeError(f"{request.url.path}: a session is ended by its route, and this route does not end it")
    context: ServiceContext = request.app.state.context
    reads = request.method in _READ_METHODS
    session = (context.read_session_factory if reads else context.session_factory)()
    end_with_endpoint(RequestSession(session, commit=not reads))
    return session


# Committed before the response goes out (app.api.routing), so a failed commit is never a 2xx.
SessionDep = Annotated[Session, Depends(get_session)]


async def get_reads(request: Request) -> Reads:
    return request.app.state.context.reads


# For a route that only reads: ``await reads.run(plain function of a session)`` (app.reads).
ReadsDep = Annotated[Reads, Depends(get_reads)]


async def get_writes(request: Request) -> Writes:
    return request.app.state.context.writes


# For a coroutine route that writes: ``await writes.run(plain function of a session)``, or
# ``writes.alone(statement, params)`` for a one-statement write that is its whole work (app.writes).
WritesDep = Annotated[Writes, Depends(get_writes)]


def verify_authorization(
    verifier: TokenVerifier, authorization: str | None, *, keys_at_hand: bool = False
) -> VerifiedToken:
    """The verified token of an ``Authorization: Bearer`` header, or the 401 that says what is wrong."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        if authorization:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        raise Unauthorized("this request needs an 'Authorization: Bearer <token>' header", error="missing_token")
    return verifier.verify(token, keys_at_hand=keys_at_hand)


_VERIFIED_TOKEN = "mms.verified_token"


async def request_token(scope: Scope, verifier: TokenVerifier, authorization: str | None) -> VerifiedToken:
    """The request's verified token, verified once per request: the body gate verifies a
    request's token before reading its body, and the caller dependency then finds it here.

    On the event loop while the signing key is at hand (as it is but once per key); loading
    one (the database, an issuer's JWKS) goes to the thread pool.
    """
    state = scope.setdefault("state", {})
    kept = state.get(_VERIFIED_TOKEN)
    if kept is not None and kept[0] == authorization:
        return kept[1]
    try:
        verified = verify_authorization(verifier, authorization, keys_at_hand=True)
    except KeyNotAtHand:
        verified = await run_in_threadpool(verify_authorization, verifier, authorization)
    state[_VERIFIED_TOKEN] = (authorization, verified)
    return verified


async def get_caller(request: Request) -> Caller:
    """The verified caller, or 401 with a WWW-Authenticate challenge.

    From memory while the signing key and the caller's roles are at hand (as they are but once
    per key and per MMS_AUTH_CACHE_SECONDS); roles to load are read with ``context.reads`` (on the
    event loop on PostgreSQL), a key to load (the database, an issuer's JWKS) in the thread pool.
    The OpenAPI document declares its security schemes (app.api.openapi): solving them here
    would parse the header twice more per request for nothing.
    """
    context: ServiceContext = request.app.state.context
    verified = await request_token(request.scope, context.verifier, request.headers.get("authorization"))
    grants = context.grants_cache.get(verified.issuer, verified.subject)
    if grants is not None:
        return caller_for(verified, grants)
    # A read of its own, as for the account: the request's session (a write's transaction,
    # its connection, SQLite's write lock) starts with the route's own work.
    return await context.reads.run(lambda session: load_caller(session, verified, context.grants_cache))


CallerDep = Annotated[Caller, Depends(get_caller)]


async def check_request(
    request: Request,
    api_version: Annotated[
        str | None,
        Query(
            alias="api-version",
            description=f"default {CURRENT_API_VERSION}",
            json_schema_extra={"enum": list(SUPPORTED_API_VERSIONS)},
        ),
    ] = None,
) -> None:
    """What every /api request is checked for, in one dependency (each one costs every request
    its solving): no parameter the database would refuse, then a supported api-version
    (omitted means the current one)."""
    _check_parameters(request)
    if api_version is not None and api_version not in SUPPORTED_API_VERSIONS:
        raise BadRequest(
            f"api-version '{api_version}' is not supported; supported: {', '.join(SUPPORTED_API_VERSIONS)}",
            code="UnsupportedApiVersion",
        )


def _check_parameters(request: Request) -> None:
    """A 400 naming the query or path parameter that holds a NUL (``%00``), which the database refuses."""
    for kind, params in (("query", request.query_params.multi_items()), ("path", request.path_params.items())):
        for name, value in params:
            reason = unstorable(name + value)
            if reason:
                shown = name.replace("\x00", "%00")
                raise BadRequest(f"{kind} parameter '{shown}' {reason}", code="InvalidParameter")


def _name_rule(rule: names.NameRule) -> AfterValidator:
    """A validator whose message says in words what a name may hold."""

    def check(value: str) -> str:
        if not rule.matches(value):
            raise ValueError(f"must be {rule.rule}")
        return value

    return AfterValidator(check)


SubscriptionId = Annotated[
    str,
    Path(alias="subscriptionId"),
    _name_rule(names.SUBSCRIPTION),
]
ResourceGroup = Annotated[
    str,
    Path(alias="resourceGroup"),
    _name_rule(names.RESOURCE_GROUP),
]
AccountName = Annotated[
    str,
    Path(alias="accountName"),
    _name_rule(names.ACCOUNT),
]


async def get_account_path(
    subscription_id: SubscriptionId,
    resource_group: ResourceGroup,
    account_name: AccountName,
) -> AccountPath:
    return AccountPath(subscription_id, resource_group, account_name)


AccountPathDep = Annotated[AccountPath, Depends(get_account_path)]


def _account_for(permission: Permission, *, fresh: bool = False) -> Callable[..., Awaitable[AccountRef]]:
    async def dependency(path: AccountPathDep, caller: CallerDep, request: Request) -> AccountRef:
        context: ServiceContext = request.app.state.context
        # Authorise on the path before looking: no answer reveals what another tenant holds.
        caller.require(permission, account_scope(path.subscription_id, path.resource_group, path.name))
        if fresh:
            context.known_accounts.forget(path)
        # From memory when the account is known, else looked up in a read of its own: the
        # request's session (a write's transaction, its connection) starts only with the
        # route's own work, after an upload's body arrived.
        known = context.known_accounts.get(path)
        return known or await context.reads.run(lambda session: find_account_ref(session, path, context.known_accounts))

    return dependency


read_account = _account_for(Permission.READ)
write_account = _account_for(Permission.WRITE)
# For what stays bound to the account for long (an event stream): looked up as it opens, so it
# never follows an account another process deleted (and maybe made again) meanwhile.
read_account_now = _account_for(Permission.READ, fresh=True)
ReadableAccount = Annotated[AccountRef, Depends(read_account)]
WritableAccount = Annotated[AccountRef, Depends(write_account)]
ReadableAccountNow = Annotated[AccountRef, Depends(read_account_now)]

# A resource's id in the path, named as the original API names it (the route's {modelId}).
AssetId = Annotated[str, Path(alias="assetId")]
ClientId = Annotated[str, Path(alias="clientId")]
ImageId = Annotated[str, Path(alias="imageId")]
ManifestId = Annotated[str, Path(alias="manifestId")]
ModelId = Annotated[str, Path(alias="modelId")]
ServiceId = Annotated[str, Path(alias="serviceId")]
ComputeName = Annotated[
    str,
    Path(alias="computeName"),
    _name_rule(names.COMPUTE),
]
OperationId = Annotated[str, Path(alias="operationId")]
WebhookId = Annotated[str, Path(alias="webhookId")]
