"""Bearer tokens: every forgery and mistake the issue names gets a 401, real tokens pass."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient
from jose import jwt
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.services.principals import grant_role
from tests.external_issuer import ExternalIssuer
from tests.factories import Callers, bearer, new_account


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge_hs256(header: dict, claims: dict, secret: bytes) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _own_claims(context: ServiceContext, **overrides: object) -> dict:
    now = int(time.time())
    claims = {
        "iss": context.settings.issuer,
        "aud": context.settings.audience,
        "sub": "someone",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign_own(context: ServiceContext, claims: dict) -> str:
    key = context.signing_key()
    return jwt.encode(claims, key.pem, algorithm="RS256", headers={"kid": key.kid})


@pytest.fixture()
def protected(client: TestClient, callers: Callers) -> str:
    return new_account(client, callers.headers())


def _assert_401(client: TestClient, url: str, token: str, fragment: str = "") -> None:
    response = client.get(url, headers=bearer(token))
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["code"] == "Unauthorized"
    assert fragment in response.json()["message"]


def test_a_real_token_passes(client: TestClient, callers: Callers, protected: str) -> None:
    assert client.get(protected, headers=callers.headers()).status_code == 200


def test_missing_or_non_bearer_authorization_is_401(client: TestClient, protected: str) -> None:
    missing = client.get(protected)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="mms"'
    basic = client.get(protected, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401
    assert client.get(protected, headers=bearer("not.a.jwt")).status_code == 401


@pytest.mark.parametrize("key_format", ["pem", "der"])
def test_hs256_signed_with_the_public_key_is_refused(
    client: TestClient, app_context: ServiceContext, protected: str, key_format: str
) -> None:
    signing = app_context.signing_key()
    public = serialization.load_pem_private_key(signing.pem.encode(), None).public_key()
    encoding = serialization.Encoding.PEM if key_format == "pem" else serialization.Encoding.DER
    secret = public.public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = _forge_hs256({"alg": "HS256", "typ": "JWT", "kid": signing.kid}, _own_claims(app_context), secret)
    _assert_401(client, protected, token, "RS256")


def test_alg_none_is_refused(client: TestClient, app_context: ServiceContext, protected: str) -> None:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": app_context.signing_key().kid}).encode())
    token = f"{header}.{_b64(json.dumps(_own_claims(app_context)).encode())}."
    _assert_401(client, protected, token)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"exp": None}, "exp"),
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"aud": None}, "aud"),
        ({"nbf": int(time.time()) + 3600}, "not valid"),
    ],
)
def test_bad_claims_are_refused(
    client: TestClient, app_context: ServiceContext, protected: str, overrides: dict, fragment: str
) -> None:
    _assert_401(client, protected, _sign_own(app_context, _own_claims(app_context, **overrides)), fragment)


def test_untrusted_issuer_is_refused(client: TestClient, app_context: ServiceContext, protected: str) -> None:
    token = _sign_own(app_context, _own_claims(app_context, iss="https://evil.example/"))
    _assert_401(client, protected, token, "issuer")


def test_tampered_signature_and_payload_are_refused(client: TestClient, callers: Callers, protected: str) -> None:
    token = callers.token()
    header, payload, signature = token.split(".")
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    _assert_401(client, protected, f"{header}.{payload}.{flipped}")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "somebody-else"
    _assert_401(client, protected, f"{header}.{_b64(json.dumps(claims).encode())}.{signature}")


def test_missing_or_unknown_kid_is_refused(client: TestClient, app_context: ServiceContext, protected: str) -> None:
    key = app_context.signing_key()
    no_kid = jwt.encode(_own_claims(app_context), key.pem, algorithm="RS256")
    _assert_401(client, protected, no_kid, "kid")
    unknown = jwt.encode(_own_claims(app_context), key.pem, algorithm="RS256", headers={"kid": "nope"})
    _assert_401(client, protected, unknown, "unknown key")


def test_external_issuer_token_with_a_grant(
    client: TestClient, callers: Callers, db: Session, external_issuer: ExternalIssuer, protected: str
) -> None:
    token = external_issuer.token(subject="aad-object-1")
    assert client.get(protected, headers=bearer(token)).status_code == 403  # valid, but no role yet
    grant_role(db, issuer=external_issuer.issuer, subject="aad-object-1", role="Reader", scope="/subscriptions/sub-1")
    assert client.get(protected, headers=bearer(token)).status_code == 200
    # A new key at the issuer is picked up on the first token that names it.
    external_issuer.rotate()
    rotated = external_issuer.token(subject="aad-object-1")
    assert client.get(protected, headers=bearer(rotated)).status_code == 200
    wrong_audience = external_issuer.token(subject="aad-object-1", audience="https://other.example")
    _assert_401(client, protected, wrong_audience, "audience")


def test_external_token_signed_by_a_stranger_with_a_known_kid_is_refused(
    client: TestClient, external_issuer: ExternalIssuer, protected: str
) -> None:
    impostor = ExternalIssuer(external_issuer.issuer)
    claims = {"iss": external_issuer.issuer, "aud": "mms-api", "oid": "x", "exp": int(time.time()) + 60}
    kid = external_issuer.jwks["keys"][0]["kid"]
    forged = jwt.encode(claims, impostor._keys[0][1], algorithm="RS256", headers={"kid": kid})
    _assert_401(client, protected, forged)


def test_jwks_publishes_the_signing_key(client: TestClient, app_context: ServiceContext) -> None:
    keys = client.get("/.well-known/jwks.json").json()["keys"]
    assert app_context.signing_key().kid in {k["kid"] for k in keys}
    assert all("d" not in k for k in keys)  # public parts only
    config = client.get("/.well-known/openid-configuration").json()
    assert config["issuer"] == app_context.settings.issuer


def test_token_endpoint(client: TestClient, callers: Callers) -> None:
    client_id, secret = callers.credentials("Reader", "/subscriptions/sub-1")
    ok = client.post(
        "/oauth2/token", data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    )
    assert ok.status_code == 200
    assert ok.json()["token_type"] == "Bearer"
    assert ok.json()["expires_in"] == 3600
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    via_basic = client.post(
        "/oauth2/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert via_basic.status_code == 200

    wrong = client.post(
        "/oauth2/token", data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": "wrong"}
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"
    assert "wrong" not in wrong.text.replace("is wrong", "")
    grant = client.post(
        "/oauth2/token", data={"grant_type": "password", "client_id": client_id, "client_secret": secret}
    )
    assert grant.status_code == 400
    assert grant.json()["error"] == "unsupported_grant_type"
