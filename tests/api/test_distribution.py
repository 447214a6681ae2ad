"""The /v2 pull API over a real image layout: every route, every error code, both kinds of token."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jose import jwt
from sqlalchemy.orm import Session

from app.auth.keys import create_signing_key
from app.auth.registry_tokens import engine_pull_token
from app.auth.tokens import issue_token, sign_token
from app.context import ServiceContext
from app.image_store import image_layout
from app.image_store.oci_layout import OCI_MANIFEST, OciLayout
from app.main import create_app
from app.services.image_store import collect_garbage
from tests.factories import Callers, bearer, new_account
from tests.image_store.test_oci_layout import BuiltImage, build_image

VERSION_HEADER = "Docker-Distribution-API-Version"


@pytest.fixture()
def registry_context(app_context: ServiceContext, tmp_path) -> ServiceContext:  # type: ignore[no-untyped-def]
    """The test's service context with a data folder of its own, so the layout is the test's."""
    settings = app_context.settings.model_copy(update={"data_dir": tmp_path / "data"})
    return ServiceContext.build(settings, engine=app_context.engine, session_factory=app_context.session_factory)


@pytest.fixture()
def v2(registry_context: ServiceContext) -> Iterator[TestClient]:
    yield TestClient(create_app(context=registry_context), base_url="http://testserver")


@pytest.fixture()
def layout(registry_context: ServiceContext) -> OciLayout:
    return image_layout(registry_context.settings)


@dataclass
class Tenant:
    """An account with an image in the layout and a Reader principal on it."""

    account_id: str
    scope: str
    repository: str
    image: BuiltImage
    client_id: str
    secret: str

    def basic(self) -> tuple[str, str]:
        return self.client_id, self.secret


def _tenant(client: TestClient, owner: dict[str, str], callers: Callers, layout: OciLayout) -> Tenant:
    url = new_account(client, owner)
    account_id = client.get(url, headers=owner).json()["properties"]["accountId"]
    repository = f"{account_id}/housing"
    image = build_image(layout, repository, "1")
    scope = url.removeprefix("/api")
    client_id, secret = callers.credentials("Reader", scope)
    return Tenant(account_id, scope, repository, image, client_id, secret)


@pytest.fixture()
def tenant(client: TestClient, owner: dict[str, str], callers: Callers, layout: OciLayout) -> Tenant:
    return _tenant(client, owner, callers, layout)


@pytest.fixture()
def other(client: TestClient, owner: dict[str, str], callers: Callers, layout: OciLayout) -> Tenant:
    return _tenant(client, owner, callers, layout)


def _pull_token(v2: TestClient, tenant: Tenant, *repositories: str) -> str:
    scopes = [("scope", f"repository:{name}:pull") for name in repositories]
    response = v2.get("/v2/token", params=[("service", "mms"), *scopes], auth=tenant.basic())
    assert response.status_code == 200, response.text
    return response.json()["token"]


def _error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers[VERSION_HEADER] == "registry/2.0"
    body = response.json()
    assert list(body) == ["errors"] and body["errors"][0]["code"] == code, body
    return body["errors"][0]


# -- GET /v2/ and the challenge -----------------------------------------------------------


def test_base_route_challenges_then_answers(v2: TestClient, tenant: Tenant, callers: Callers) -> None:
    for path in ("/v2/", "/v2"):
        response = v2.get(path)
        _error(response, 401, "UNAUTHORIZED")
        challenge = 'Bearer realm="http://127.0.0.1:8000/v2/token",service="mms"'
        assert response.headers["WWW-Authenticate"] == challenge
    token = _pull_token(v2, tenant)
    for headers in (bearer(token), callers.headers("Reader", tenant.scope)):
        response = v2.get("/v2/", headers=headers)
        assert response.status_code == 200 and response.json() == {}
        assert response.headers[VERSION_HEADER] == "registry/2.0"
        assert v2.head("/v2/", headers=headers).status_code == 200
    assert v2.get("/v2/", auth=tenant.basic()).status_code == 401  # Basic only at the token endpoint
    _error(v2.get("/v2/", headers=bearer("not-a-jwt")), 401, "UNAUTHORIZED")


def test_repository_routes_challenge_with_their_scope(v2: TestClient, tenant: Tenant) -> None:
    for path in (
        f"/v2/{tenant.repository}/manifests/1",
        f"/v2/{tenant.repository}/tags/list",
        f"/v2/{tenant.repository}/blobs/{tenant.image.layer_digest}",
    ):
        response = v2.get(path)
        _error(response, 401, "UNAUTHORIZED")
        assert response.headers["WWW-Authenticate"] == (
            f'Bearer realm="http://127.0.0.1:8000/v2/token",service="mms",scope="repository:{tenant.repository}:pull"'
        )
    assert v2.head(f"/v2/{tenant.repository}/manifests/1").status_code == 401


# -- the token endpoint -------------------------------------------------------------------


def test_token_grants_pull_on_what_the_principal_may_read(
    v2: TestClient, tenant: Tenant, other: Tenant, registry_context: ServiceContext
) -> None:
    response = v2.get(
        "/v2/token",
        params=[
            ("service", "mms"),
            ("scope", f"repository:{tenant.repository}:pull,push"),
            ("scope", f"repository:{other.repository}:pull"),
            ("scope", "registry:catalog:*"),
            ("scope", "repository:../../etc:pull"),
            ("scope", "repository::pull"),
            ("scope", "nonsense"),
        ],
        auth=tenant.basic(),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == registry_context.settings.token_ttl_seconds
    assert response.headers["Cache-Control"] == "no-store"
    claims = jwt.get_unverified_claims(body["token"])
    assert claims["sub"] == tenant.client_id and claims["iss"] == "mms"
    # Push, the other account's repository and every malformed scope are silently left out.
    assert claims["access"] == [{"type": "repository", "name": tenant.repository, "actions": ["pull"]}]

    headers = bearer(body["token"])
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=headers).status_code == 200
    # A token naming its repositories, and a principal that may not read the other account.
    _error(v2.get(f"/v2/{other.repository}/manifests/1", headers=headers), 403, "DENIED")
    # Not an API token: its audience is the registry's.
    assert v2.get(f"/api{tenant.scope}", headers=headers).status_code == 401


def test_token_needs_the_right_secret(v2: TestClient, tenant: Tenant, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    scope = {"scope": f"repository:{tenant.repository}:pull"}
    wrong = v2.get("/v2/token", params=scope, auth=(tenant.client_id, tenant.secret + "x"))
    _error(wrong, 401, "UNAUTHORIZED")
    assert wrong.headers["WWW-Authenticate"] == 'Basic realm="http://127.0.0.1:8000/v2/token"'
    _error(v2.get("/v2/token", params=scope, auth=(str(uuid.uuid4()), tenant.secret)), 401, "UNAUTHORIZED")
    _error(v2.get("/v2/token", params=scope), 401, "UNAUTHORIZED")
    _error(v2.get("/v2/token", params=scope, headers={"Authorization": "Basic !!notbase64"}), 401, "UNAUTHORIZED")
    _error(v2.get("/v2/token", params={**scope, "service": "elsewhere"}, auth=tenant.basic()), 400, "UNSUPPORTED")
    assert v2.get("/v2/token", params=scope, auth=tenant.basic()).status_code == 200
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "registry.token_issued" in logged and tenant.secret not in logged


def test_a_token_for_other_repositories_asks_for_a_better_one(v2: TestClient, tenant: Tenant) -> None:
    token = _pull_token(v2, tenant)  # as `docker login` gets it: no scope
    response = v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(token))
    _error(response, 401, "UNAUTHORIZED")
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert f'scope="repository:{tenant.repository}:pull"' in response.headers["WWW-Authenticate"]


def test_bad_registry_tokens_are_refused(v2: TestClient, tenant: Tenant, registry_context: ServiceContext) -> None:
    key = registry_context.signing_key()
    now = int(time.time())
    claims = {
        "iss": "mms",
        "aud": f"{registry_context.settings.audience}/v2",
        "sub": tenant.client_id,
        "iat": now - 7200,
        "nbf": now - 7200,
        "exp": now - 3600,
        "access": [{"type": "repository", "name": tenant.repository, "actions": ["pull"]}],
    }
    expired = jwt.encode(claims, key.pem, algorithm="RS256", headers={"kid": key.kid})
    response = v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(expired))
    _error(response, 401, "UNAUTHORIZED")
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    forged = _pull_token(v2, tenant, tenant.repository)[:-4] + "AAAA"
    _error(v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(forged)), 401, "UNAUTHORIZED")


def test_a_registry_token_signed_with_a_key_made_since_is_accepted(
    v2: TestClient, tenant: Tenant, registry_context: ServiceContext, db: Session
) -> None:
    token = _pull_token(v2, tenant, tenant.repository)
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(token)).status_code == 200
    # Another API process rotates in a key this one has not seen, and signs with it.
    rotated = create_signing_key(db, sealer=registry_context.sealer)
    claims = jwt.get_unverified_claims(token)
    fresh = sign_token(
        rotated,
        issuer=claims["iss"],
        audience=claims["aud"],
        subject=claims["sub"],
        ttl_seconds=300,
        claims={"access": claims["access"]},
    )
    assert jwt.get_unverified_header(fresh)["kid"] != jwt.get_unverified_header(token)["kid"]
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(fresh)).status_code == 200


def test_roles_are_checked_again_on_every_pull(
    v2: TestClient, tenant: Tenant, client: TestClient, owner: dict[str, str]
) -> None:
    token = _pull_token(v2, tenant, tenant.repository)
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(token)).status_code == 200
    assert client.delete(f"/api/servicePrincipals/{tenant.client_id}", headers=owner).status_code == 204
    _error(v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(token)), 403, "DENIED")


def test_the_services_own_access_tokens_pull_too(
    v2: TestClient, tenant: Tenant, other: Tenant, callers: Callers
) -> None:
    reader = callers.headers("Reader", tenant.scope)
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=reader).status_code == 200
    _error(v2.get(f"/v2/{other.repository}/manifests/1", headers=reader), 403, "DENIED")
    _error(v2.get("/v2/library/ubuntu/manifests/latest", headers=reader), 403, "DENIED")
    owner = callers.headers()  # Owner of everything
    assert v2.get(f"/v2/{other.repository}/manifests/1", headers=owner).status_code == 200


def test_the_engine_token_pulls_its_one_image_and_nothing_else(
    v2: TestClient, tenant: Tenant, other: Tenant, registry_context: ServiceContext, client: TestClient
) -> None:
    """The smoke test's pull token: no principal behind it, pull of one repository, short-lived."""
    token = engine_pull_token(registry_context, tenant.repository, ttl_seconds=60)
    assert v2.get("/v2/", headers=bearer(token)).status_code == 200
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(token)).status_code == 200
    blob = tenant.image.layer_digest
    assert v2.get(f"/v2/{tenant.repository}/blobs/{blob}", headers=bearer(token)).status_code == 200
    _error(v2.get(f"/v2/{other.repository}/manifests/1", headers=bearer(token)), 403, "DENIED")
    assert client.get("/api/accounts", headers=bearer(token)).status_code == 401  # no API token
    expired = engine_pull_token(registry_context, tenant.repository, ttl_seconds=-3600)
    _error(v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(expired)), 401, "UNAUTHORIZED")


def test_the_engine_token_pulls_a_published_base_it_names_and_no_other(
    v2: TestClient, tenant: Tenant, layout: OciLayout, registry_context: ServiceContext, callers: Callers
) -> None:
    """The docker builder's FROM on the embedded default: a base under mms/, which no account
    owns, pulled by a token naming that one repository and no other."""
    base = build_image(layout, "mms/imported/conda", "1")
    build_image(layout, "mms/imported/other", "1")
    token = engine_pull_token(registry_context, "mms/imported/conda", ttl_seconds=60)
    assert v2.get("/v2/mms/imported/conda/manifests/1", headers=bearer(token)).status_code == 200
    blob = v2.get(f"/v2/mms/imported/conda/blobs/{base.layer_digest}", headers=bearer(token))
    assert blob.status_code == 200
    _error(v2.get("/v2/mms/imported/other/manifests/1", headers=bearer(token)), 403, "DENIED")
    _error(v2.get(f"/v2/{tenant.repository}/manifests/1", headers=bearer(token)), 403, "DENIED")


def test_a_caller_who_reads_an_account_pulls_the_published_bases_and_one_without_a_role_does_not(
    v2: TestClient, tenant: Tenant, layout: OciLayout, callers: Callers, registry_context: ServiceContext
) -> None:
    """The bases every account's builds may name (published and imported, under mms/) are
    pulled by their users too (`docker pull` to try a base, to build on it elsewhere)."""
    base = build_image(layout, "mms/inference-base", "latest")
    reader = callers.headers("Reader", tenant.scope)
    assert v2.get("/v2/mms/inference-base/manifests/latest", headers=reader).status_code == 200
    assert v2.get(f"/v2/mms/inference-base/blobs/{base.layer_digest}", headers=reader).status_code == 200
    settings = registry_context.settings
    nobody = bearer(
        issue_token(
            registry_context.signing_key(),
            issuer=settings.issuer,
            audience=settings.audience,
            subject="no-role-anywhere",
            ttl_seconds=60,
        )
    )
    _error(v2.get("/v2/mms/inference-base/manifests/latest", headers=nobody), 403, "DENIED")


# -- manifests ----------------------------------------------------------------------------


def test_manifests_by_tag_and_digest_get_and_head(v2: TestClient, tenant: Tenant, callers: Callers) -> None:
    headers = callers.headers("Reader", tenant.scope)
    image = tenant.image
    for reference in ("1", image.manifest_digest):
        got = v2.get(
            f"/v2/{tenant.repository}/manifests/{reference}",
            headers={**headers, "Accept": f"{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"},
        )
        assert got.status_code == 200
        assert got.content == image.manifest
        assert got.headers["Content-Type"] == OCI_MANIFEST
        assert got.headers["Docker-Content-Digest"] == image.manifest_digest
        assert got.headers["Content-Length"] == str(len(image.manifest))
        assert got.headers[VERSION_HEADER] == "registry/2.0"
        head = v2.head(f"/v2/{tenant.repository}/manifests/{reference}", headers=headers)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["Content-Length"] == str(len(image.manifest))
        assert head.headers["Docker-Content-Digest"] == image.manifest_digest
        assert head.headers["Content-Type"] == OCI_MANIFEST
        for answer in (got, head):  # a tenant's bytes: never a page of the API's origin
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
            assert answer.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
            assert answer.headers["Content-Disposition"].startswith("attachment;")


def test_manifest_errors(v2: TestClient, tenant: Tenant, callers: Callers, layout: OciLayout) -> None:
    headers = callers.headers("Reader", tenant.scope)
    base = f"/v2/{tenant.repository}/manifests"
    _error(v2.get(f"{base}/2", headers=headers), 404, "MANIFEST_UNKNOWN")
    assert v2.head(f"{base}/2", headers=headers).status_code == 404
    _error(v2.get(f"{base}/sha256:{'0' * 64}", headers=headers), 404, "MANIFEST_UNKNOWN")
    _error(v2.get(f"{base}/sha256:xyz", headers=headers), 400, "DIGEST_INVALID")
    _error(v2.get(f"{base}/md5:abc", headers=headers), 400, "DIGEST_INVALID")
    _error(v2.get(f"{base}/-bad", headers=headers), 400, "TAG_INVALID")
    _error(v2.get(f"{base}/{'a' * 200}", headers=headers), 400, "TAG_INVALID")
    # A manifest of another repository of the same account is not reachable through this one.
    sibling = build_image(layout, f"{tenant.account_id}/other", "1", files={"x.txt": b"x"})
    _error(v2.get(f"{base}/{sibling.manifest_digest}", headers=headers), 404, "MANIFEST_UNKNOWN")
    _error(v2.get(f"/v2/{tenant.account_id}/never-built/manifests/1", headers=headers), 404, "MANIFEST_UNKNOWN")


def test_an_empty_layout_answers_404_not_500(
    v2: TestClient, callers: Callers, client: TestClient, owner: dict[str, str], layout: OciLayout
) -> None:
    url = new_account(client, owner)
    account_id = client.get(url, headers=owner).json()["properties"]["accountId"]
    assert not layout.root.exists()
    _error(v2.get(f"/v2/{account_id}/housing/manifests/1", headers=owner), 404, "MANIFEST_UNKNOWN")
    _error(v2.get(f"/v2/{account_id}/housing/tags/list", headers=owner), 404, "NAME_UNKNOWN")
    _error(v2.get(f"/v2/{account_id}/housing/blobs/sha256:{'0' * 64}", headers=owner), 404, "BLOB_UNKNOWN")
    assert not layout.root.exists()


# -- blobs --------------------------------------------------------------------------------


def test_blobs_get_head_and_range(v2: TestClient, tenant: Tenant, callers: Callers) -> None:
    headers = callers.headers("Reader", tenant.scope)
    image = tenant.image
    url = f"/v2/{tenant.repository}/blobs/{image.layer_digest}"
    got = v2.get(url, headers=headers)
    assert got.status_code == 200 and got.content == image.layer
    assert got.headers["Content-Length"] == str(len(image.layer))
    assert got.headers["Docker-Content-Digest"] == image.layer_digest
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers[VERSION_HEADER] == "registry/2.0"
    head = v2.head(url, headers=headers)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len(image.layer))
    assert head.headers["Docker-Content-Digest"] == image.layer_digest
    for answer in (got, head):  # a tenant's bytes: never a page of the API's origin
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
        assert answer.headers["Content-Disposition"] == (
            f'attachment; filename="{image.layer_digest.replace(":", "-")}"'
        )
    ranged = v2.get(url, headers={**headers, "Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == image.layer[:10]
    assert ranged.headers["Content-Range"] == f"bytes 0-9/{len(image.layer)}"
    config = v2.get(f"/v2/{tenant.repository}/blobs/{image.config_digest}", headers=headers)
    assert config.status_code == 200 and config.json()["rootfs"]["type"] == "layers"


def test_blob_errors(v2: TestClient, tenant: Tenant, callers: Callers, layout: OciLayout) -> None:
    headers = callers.headers("Reader", tenant.scope)
    base = f"/v2/{tenant.repository}/blobs"
    _error(v2.get(f"{base}/sha256:{'0' * 64}", headers=headers), 404, "BLOB_UNKNOWN")
    assert v2.head(f"{base}/sha256:{'0' * 64}", headers=headers).status_code == 404
    _error(v2.get(f"{base}/sha256:abc", headers=headers), 400, "DIGEST_INVALID")
    _error(v2.get(f"{base}/..%2F..%2Fetc%2Fpasswd", headers=headers), 404, "UNSUPPORTED")
    _error(v2.get(f"{base}/sha512:{'a' * 128}", headers=headers), 400, "DIGEST_INVALID")
    # Known to the layout, but through another repository only.
    sibling = build_image(layout, f"{tenant.account_id}/other", "1", files={"secret.txt": b"other image"})
    _error(v2.get(f"{base}/{sibling.layer_digest}", headers=headers), 404, "BLOB_UNKNOWN")
    # The manifest is served as a manifest, not as one of the repository's blobs.
    _error(v2.get(f"{base}/{tenant.image.manifest_digest}", headers=headers), 404, "BLOB_UNKNOWN")


# -- tags ---------------------------------------------------------------------------------


def test_tags_list_pages_with_a_link(v2: TestClient, tenant: Tenant, callers: Callers, layout: OciLayout) -> None:
    headers = callers.headers("Reader", tenant.scope)
    for tag in ("2", "3"):
        build_image(layout, tenant.repository, tag)
    url = f"/v2/{tenant.repository}/tags/list"
    everything = v2.get(url, headers=headers)
    assert everything.status_code == 200 and "Link" not in everything.headers
    assert everything.json() == {"name": tenant.repository, "tags": ["1", "2", "3"]}

    first = v2.get(url, params={"n": 2}, headers=headers)
    assert first.json()["tags"] == ["1", "2"]
    assert first.headers["Link"] == f'</v2/{tenant.repository}/tags/list?n=2&last=2>; rel="next"'
    following = v2.get(first.headers["Link"].split(">")[0].lstrip("<"), headers=headers)
    assert following.json()["tags"] == ["3"] and "Link" not in following.headers
    assert v2.get(url, params={"n": 0}, headers=headers).json()["tags"] == []
    assert v2.get(url, params={"last": "1"}, headers=headers).json()["tags"] == ["2", "3"]
    assert v2.get(url, params={"n": 10**40}, headers=headers).json()["tags"] == ["1", "2", "3"]
    for bad in ("abc", "-1", "1.5", ""):
        _error(v2.get(url, params={"n": bad}, headers=headers), 400, "PAGINATION_NUMBER_INVALID")
    _error(v2.get(f"/v2/{tenant.account_id}/never-built/tags/list", headers=headers), 404, "NAME_UNKNOWN")


# -- names, routes and methods ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v2/%2e%2e/%2e%2e/etc/manifests/1",
        "/v2/..%2F..%2Fetc/tags/list",
        "/v2/Upper/Case/tags/list",
        "/v2/a//b/tags/list",
        "/v2/%00/tags/list",
        f"/v2/{'a' * 300}/tags/list",
        "/v2//manifests/1",
    ],
)
def test_hostile_names_are_400(v2: TestClient, callers: Callers, path: str) -> None:
    _error(v2.get(path, headers=callers.headers()), 400, "NAME_INVALID")


def test_unknown_routes_and_push_methods(v2: TestClient, tenant: Tenant, callers: Callers) -> None:
    headers = callers.headers()
    _error(v2.get("/v2/_catalog", headers=headers), 404, "UNSUPPORTED")
    _error(v2.get(f"/v2/{tenant.repository}/blobs/uploads/{uuid.uuid4()}", headers=headers), 404, "UNSUPPORTED")
    for method, path in (
        ("PUT", "manifests/2"),
        ("POST", "blobs/uploads/"),
        ("PATCH", "blobs/uploads/x"),
        ("DELETE", "manifests/1"),
        ("DELETE", f"blobs/{tenant.image.layer_digest}"),
    ):
        response = v2.request(method, f"/v2/{tenant.repository}/{path}", headers=headers, content=b"{}")
        _error(response, 405, "UNSUPPORTED")
        assert response.headers["Allow"] == "GET, HEAD"
    _error(v2.post("/v2/token", headers=headers), 405, "UNSUPPORTED")
    _error(v2.post("/v2/", headers=headers), 405, "UNSUPPORTED")
    assert v2.get(f"/v2/{tenant.repository}/manifests/1", headers=headers).status_code == 200


def test_the_openapi_document_lists_the_pull_routes(v2: TestClient) -> None:
    paths = v2.get("/openapi.json").json()["paths"]  # warnings are errors: no duplicate operation ids
    assert {"/v2/", "/v2/token", "/v2/{path}"} <= set(paths)


# -- deleting an image --------------------------------------------------------------------


def test_a_deleted_image_can_no_longer_be_pulled(
    registry_context: ServiceContext, callers: Callers, account: str, owner: dict[str, str], manifest_id: str
) -> None:
    # The embedded store (no MMS_REGISTRY), where the service untags what it deletes.
    settings = registry_context.settings.model_copy(update={"registry": None})
    context = ServiceContext.build(
        settings, engine=registry_context.engine, session_factory=registry_context.session_factory
    )
    v2 = TestClient(create_app(context=context), base_url="http://testserver")
    layout = image_layout(settings)
    body = {"manifestId": manifest_id, "imageType": "Docker", "name": "Housing-Image"}
    image = v2.post(f"{account}/images", json=body, headers=owner).json()
    account_id = v2.get(account, headers=owner).json()["properties"]["accountId"]
    repository = f"{account_id}/housing-image"  # as the builders name it
    built = build_image(layout, repository, "1")  # what a worker would have pushed
    build_image(layout, repository, "2")  # another version stays
    reader = callers.headers("Reader", account.removeprefix("/api"))
    assert v2.get(f"/v2/{repository}/manifests/1", headers=reader).status_code == 200

    assert v2.delete(f"{account}/images/{image['Id']}", headers=owner).status_code == 204

    _error(v2.get(f"/v2/{repository}/manifests/1", headers=reader), 404, "MANIFEST_UNKNOWN")
    assert layout.tags(repository) == ["2"]
    # Its blobs go at the next garbage collection; then not even its digest is served.
    layout.collect_garbage(grace_seconds=0)
    _error(v2.get(f"/v2/{repository}/manifests/{built.manifest_digest}", headers=reader), 404, "MANIFEST_UNKNOWN")
    _error(v2.get(f"/v2/{repository}/blobs/{built.layer_digest}", headers=reader), 404, "BLOB_UNKNOWN")
    assert v2.get(f"/v2/{repository}/manifests/2", headers=reader).status_code == 200


def test_gc_untags_an_image_whose_row_is_gone_once_its_tag_is_old(
    registry_context: ServiceContext, account: str, owner: dict[str, str], manifest_id: str, db: Session
) -> None:
    """A crash between a deletion's commit and its untag leaves a tag with no image: the
    next collection removes it (and then its blobs), but not a tag young enough to belong to
    a build that has just pushed, nor a published base's, nor one whose image still exists."""
    settings = registry_context.settings.model_copy(update={"registry": None, "image_gc_grace_seconds": 3600})
    context = ServiceContext.build(
        settings, engine=registry_context.engine, session_factory=registry_context.session_factory
    )
    v2 = TestClient(create_app(context=context), base_url="http://testserver")
    layout = image_layout(settings)
    body = {"manifestId": manifest_id, "imageType": "Docker", "name": "Housing-Image"}
    kept = v2.post(f"{account}/images", json=body, headers=owner).json()
    account_id = v2.get(account, headers=owner).json()["properties"]["accountId"]
    repository = f"{account_id}/housing-image"
    build_image(layout, repository, str(kept["Version"]))
    orphan = build_image(layout, repository, "7")  # its row deleted, the untag never ran
    build_image(layout, f"{uuid.uuid4()}/gone-account", "1")  # an account deleted whole
    build_image(layout, "mms/inference-base", "1")  # a published base: no image row
    then = time.time() - 7200
    for path in layout.root.rglob("*"):
        os.utime(path, (then, then))
    young = build_image(layout, repository, "8")  # pushed just now, its row not seen yet

    done = collect_garbage(db, settings)

    assert done is not None and done.tags == 2
    assert layout.tags(repository) == sorted([str(kept["Version"]), "8"])
    assert layout.repositories() == sorted(["mms/inference-base", repository])
    assert layout.has_blob(orphan.layer_digest) is None  # collected in the same run
    assert layout.has_blob(young.layer_digest) is not None
