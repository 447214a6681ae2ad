"""The service's own token issuer: client credentials in, RS256 access tokens out."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Form, Request
from fastapi.responses import JSONResponse

from app.api import examples
from app.api.deps import ContextDep, SessionDep
from app.api.openapi import errors
from app.api.routing import ApiRoute
from app.auth.basic import basic_credentials
from app.auth.keys import public_jwks
from app.auth.tokens import issue_token
from app.errors import ServiceError
from app.schemas.common import OAuthErrorBody
from app.schemas.principals import TokenResponse
from app.services.principals import authenticate_client

router = APIRouter(tags=["tokens"], route_class=ApiRoute)


class OAuthError(ServiceError):
    """An RFC 6749 error: the service's error shape plus the standard ``error`` fields."""

    def __init__(self, error: str, description: str, status_code: int = 400) -> None:
        super().__init__(description, code=error)
        self.status_code = status_code
        self.error = error
        if status_code == 401:
            self.headers = {"WWW-Authenticate": 'Basic realm="mms"'}

    def body(self) -> dict[str, Any]:
        return {**super().body(), "error": self.error, "error_description": self.message}


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    try:
        basic = basic_credentials(request.headers.get("authorization"))
    except ValueError as exc:
        raise OAuthError("invalid_request", str(exc)) from None
    if basic is None:
        return None
    # client_secret_basic form-encodes the id and secret first (RFC 6749 2.3.1).
    client_id, secret = basic
    return unquote_plus(client_id), unquote_plus(secret)


@router.post(
    "/oauth2/token",
    response_model=TokenResponse,
    responses=errors(400, s400="A missing field, or (with RFC 6749's error fields) an unsupported grant type.")
    | errors(401, model=OAuthErrorBody, s401="The client id or secret is wrong."),
    openapi_extra={"requestBody": {"content": {"application/x-www-form-urlencoded": {"examples": examples.TOKEN}}}},
)
def token(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    grant_type: Annotated[str, Form()],
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
) -> TokenResponse:
    """Exchange a service principal's client id and secret for an access token."""
    if grant_type != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
    basic = _basic_credentials(request)
    if basic is not None:
        client_id, client_secret = basic
    if not client_id or not client_secret:
        raise OAuthError("invalid_request", "client_id and client_secret are required")
    principal = authenticate_client(session, client_id=client_id, client_secret=client_secret)
    if principal is None:
        raise OAuthError("invalid_client", "the client id or secret is wrong", status_code=401)
    ttl = context.settings.token_ttl_seconds
    access_token = issue_token(
        context.signing_key(),
        issuer=context.settings.issuer,
        audience=context.settings.audience,
        subject=principal.client_id,
        ttl_seconds=ttl,
    )
    return TokenResponse(access_token=access_token, expires_in=ttl)


@router.get("/.well-known/jwks.json")
def jwks(session: SessionDep) -> JSONResponse:
    """The public keys the service signs its tokens with."""
    return JSONResponse(public_jwks(session), headers={"Cache-Control": "public, max-age=300"})


@router.get("/.well-known/openid-configuration")
def openid_configuration(context: ContextDep) -> dict[str, Any]:
    base = context.settings.resolved_public_url
    return {
        "issuer": context.settings.issuer,
        "token_endpoint": f"{base}/oauth2/token",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }
