"""The OpenAPI document's own promises: short ids, the one error body, no FastAPI 422, the
headers, enums and examples it declares, and a client-credentials sign-in for /docs.
(tests/api/test_openapi_fuzz.py checks the service's answers against it.)"""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

OPERATION_ID = re.compile(r"[a-z]+(_[a-z]+)+")
ERROR = "#/components/schemas/ErrorBody"
# Answered with no body: 304 Not Modified, 416 (a log follower's "nothing new yet").
BODILESS = {"304", "416"}


@pytest.fixture()
def document(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def test_operation_ids_are_short_stable_and_unique(document: dict[str, Any]) -> None:
    ids = [op["operationId"] for _, _, op in _operations(document)]
    assert all(OPERATION_ID.fullmatch(i) for i in ids), ids
    assert len(ids) == len(set(ids))
    account = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
    assert document["paths"][f"{account}/models"]["post"]["operationId"] == "models_register"
    assert document["paths"][f"{account}/models/{{modelId}}"]["get"]["operationId"] == "models_get"
    assert document["paths"][f"{account}/images"]["post"]["operationId"] == "images_create"
    assert document["paths"][f"{account}/manifests"]["get"]["operationId"] == "manifests_list"
    assert document["paths"]["/oauth2/token"]["post"]["operationId"] == "tokens_token"
    services = {
        ("post", "/services"): "services_create",
        ("get", "/services"): "services_list",
        ("get", "/services/{serviceId}"): "services_get",
        ("patch", "/services/{serviceId}"): "services_update",
        ("delete", "/services/{serviceId}"): "services_delete",
        ("post", "/services/{serviceId}/keys"): "services_list_keys",
        ("post", "/services/{serviceId}/regenerateKeys"): "services_regenerate_keys",
        ("put", "/computes/{computeName}"): "computes_put",
        ("get", "/computes"): "computes_list",
        ("delete", "/computes/{computeName}"): "computes_delete",
    }
    assert {key: document["paths"][account + key[1]][key[0]]["operationId"] for key in services} == services


IDEMPOTENT_CREATES = {"models_register", "manifests_create", "images_create", "services_create"}


def test_every_create_takes_an_idempotency_key_and_says_when_it_replays(document: dict[str, Any]) -> None:
    for _method, _path, op in _operations(document):
        if op["operationId"] not in IDEMPOTENT_CREATES:
            continue
        assert any(p["name"] == "Idempotency-Key" and p["in"] == "header" for p in op["parameters"]), op["operationId"]
        answer = op["responses"]["202" if op["operationId"] in {"images_create", "services_create"} else "200"]
        assert "Idempotent-Replayed" in answer["headers"], op["operationId"]


def test_no_validation_422_and_every_4xx_has_the_error_body(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["ErrorBody"]["required"]) == {"code", "message", "statusCode", "details"}
    for method, path, op in _operations(document):
        responses = op["responses"]
        # The only 422: an Idempotency-Key reused for another body (app.api.idempotent).
        assert "422" not in responses or op["operationId"] in IDEMPOTENT_CREATES, (method, path)
        for status, response in responses.items():
            if not status.startswith("4") or status in BODILESS:
                continue
            schema = response["content"]["application/json"]["schema"]
            if path.startswith("/v2"):  # the distribution spec's shape
                assert schema == {"$ref": "#/components/schemas/DistributionErrorBody"}, (method, path, status)
            elif path == "/oauth2/token" and status == "401":
                assert schema == {"$ref": "#/components/schemas/OAuthErrorBody"}
            else:
                assert schema == {"$ref": ERROR}, (method, path, status)


def test_each_operation_declares_the_errors_it_can_answer(document: dict[str, Any]) -> None:
    account = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
    for method, path, op in _operations(document):
        statuses = set(op["responses"])
        if path.startswith(account):  # a PUT creates what its path names: no 404
            expected = {"400", "401", "403", "503"} | ({"404"} if method != "PUT" else set())
            assert expected <= statuses, (method, path)
        if "requestBody" in op:
            assert {"400", "413"} <= statuses, (method, path)
    assert "409" in document["paths"][f"{account}/models/{{modelId}}"]["delete"]["responses"]
    assert "409" in document["paths"][f"{account}/images/{{imageId}}/cancel"]["post"]["responses"]
    assert "413" in document["paths"][f"{account}/assets"]["post"]["responses"]
    for method, path in (
        ("post", "/services"),  # ServiceExists
        ("patch", "/services/{serviceId}"),  # ServiceBusy, ServiceDeleting
        ("post", "/services/{serviceId}/regenerateKeys"),  # ServiceDeleting
        ("put", "/computes/{computeName}"),  # BuiltInCompute, ComputeInUse
        ("delete", "/computes/{computeName}"),
        ("delete", "/images/{imageId}"),  # ImageInUse
    ):
        assert "409" in document["paths"][f"{account}{path}"][method]["responses"], (method, path)
    unauthorized = document["paths"][f"{account}/models"]["get"]["responses"]["401"]
    assert unauthorized["headers"]["WWW-Authenticate"]["required"] is True


def test_response_headers_are_declared_where_they_are_set(document: dict[str, Any]) -> None:
    account = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
    created = document["paths"][f"{account}/images"]["post"]["responses"]["202"]["headers"]
    assert created["Operation-Location"]["required"] is True
    for method, path in (
        ("post", "/services"),
        ("patch", "/services/{serviceId}"),
        ("delete", "/services/{serviceId}"),
    ):
        accepted = document["paths"][f"{account}{path}"][method]["responses"]["202"]["headers"]
        assert accepted["Operation-Location"]["required"] is True, (method, path)
    image = document["paths"][f"{account}/images/{{imageId}}"]["get"]["responses"]
    assert {"ETag", "Retry-After"} <= set(image["200"]["headers"]) and "304" in image
    assert (
        "Retry-After"
        in document["paths"][f"{account}/operations/{{operationId}}"]["get"]["responses"]["200"]["headers"]
    )
    assert "ETag" in document["paths"][f"{account}/models"]["get"]["responses"]["200"]["headers"]
    assert "Retry-After" in document["paths"][f"{account}/models"]["get"]["responses"]["503"]["headers"]


def test_states_are_enums(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["DeliveryState"]["enum"] == ["Pending", "Delivered", "Failed"]
    assert schemas["DeliveryRead"]["properties"]["state"] == {"$ref": "#/components/schemas/DeliveryState"}
    account = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
    parameters = document["paths"][f"{account}/webhooks/{{webhookId}}/deliveries"]["get"]["parameters"]
    state = next(p for p in parameters if p["name"] == "state")
    assert ["Pending", "Delivered", "Failed"] in (
        [s.get("enum") for s in state["schema"].get("anyOf", [])] + [state["schema"].get("enum")]
    )


def test_every_request_body_is_declared_with_examples(document: dict[str, Any]) -> None:
    for method, path, op in _operations(document):
        body = op.get("requestBody")
        if body is None:
            continue
        media = body["content"]
        if "application/octet-stream" in media:  # the asset upload: raw bytes
            assert media["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
            continue
        assert any(m.get("examples") for m in media.values()), (method, path)
    account = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
    upload = document["paths"][f"{account}/assets"]["post"]
    assert upload["requestBody"]["required"] is True
    model = document["paths"][f"{account}/models"]["post"]["requestBody"]["content"]["application/json"]
    assert model["examples"]["seed"]["value"]["name"] == "housing.model"
    manifest = document["paths"][f"{account}/manifests"]["post"]["requestBody"]["content"]["application/json"]
    assert set(manifest["examples"]) == {"seed", "inference-config"}


def test_the_seed_examples_are_accepted(
    client: TestClient, owner: dict[str, str], account: str, document: dict[str, Any]
) -> None:
    """The examples are bodies the service takes, not just pictures of them."""
    template = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}/models"
    example = document["paths"][template]["post"]["requestBody"]["content"]["application/json"]["examples"]["seed"]
    response = client.post(f"{account}/models", json=example["value"], headers=owner)
    assert response.status_code == 200, response.text


def test_docs_can_sign_in_with_client_credentials(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["OAuth2ClientCredentials"]["flows"] == {
        "clientCredentials": {"tokenUrl": "/oauth2/token", "scopes": {}}
    }
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    account = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
    security = document["paths"][f"{account}/models"]["get"]["security"]
    assert {"HTTPBearer": []} in security and {"OAuth2ClientCredentials": []} in security
