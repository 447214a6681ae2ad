"""Input no column, driver or encoder can take is a 400 naming the field, never a 500."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.context import ServiceContext
from app.errors import BadRequest, error_response
from app.services.event_ids import EventIds
from tests.api.test_manifests import seed_manifest
from tests.factories import model_body


def _token(position: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def _post(client: TestClient, url: str, body: dict[str, Any], owner: dict[str, str]):
    # json.dumps writes a lone surrogate as the escape "\ud800", as a client's encoder would.
    return client.post(url, content=json.dumps(body), headers={**owner, "Content-Type": "application/json"})


FORGED_POSITIONS = [
    {"n": "a", "v": 99999999999999999999999999999},  # past an INTEGER column
    {"n": "a", "v": 2**31},
    {"n": "a", "v": -1},
    {"n": "a\u0000", "v": 1},  # PostgreSQL refuses NUL
    {"n": "\ud800", "v": 1},  # no UTF-8 for a lone surrogate
    {"n": "a", "v": True},
]


def test_a_forged_skip_token_is_a_400_naming_it(client: TestClient, owner: dict[str, str], account: str) -> None:
    accounts = "/api/subscriptions/sub-1/resourceGroups/rg-1/accounts"
    cases = [
        (f"{account}/{path}", _token(position))
        for path in ("models", "manifests", "images")
        for position in FORGED_POSITIONS
    ]
    cases += [
        (accounts, token)
        for token in (_token({"n": "a" * 2000}), _token({"n": ["a"]}), base64.urlsafe_b64encode(b"[" * 5000).decode())
    ]
    webhook = client.post(f"{account}/webhooks", json={"url": "https://hooks.example.com/x"}, headers=owner)
    assert webhook.status_code == 201, webhook.text
    deliveries = f"{account}/webhooks/{webhook.json()['id']}/deliveries"
    # Its position is an event id's token, never the id (a Reader would read the global count).
    cases += [(deliveries, _token({"e": position})) for position in (2**63, 5, "5", "a" * 22, "\u0000")]
    for url, token in cases:
        response = client.get(url, params={"$skipToken": token}, headers=owner)
        assert response.status_code == 400, (url, token, response.text)
        assert "$skipToken" in response.json()["message"], response.text


def _flipped(token: str, bit: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    raw[bit // 8] ^= 1 << (bit % 8)
    return base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


def test_an_event_id_that_is_not_one_is_a_400_naming_it(
    client: TestClient, owner: dict[str, str], account: str, app_context: ServiceContext
) -> None:
    token = app_context.event_ids.token(7)  # an id this service sends (any id: it checks no table)
    assert app_context.event_ids.event_id(token) == 7
    values = [
        "99999999999999999999999",
        "9" * 5000,
        "²",
        "-1",
        "1e3",
        "0",  # plain numbers, as ids were before: no longer ids
        "7",
        "yesterday",
        token + "A",  # too long
        token[:-1],  # too short
        token[:-1] + ("B" if token[-1] == "A" else "A"),  # the same block's other spelling, or another block
        EventIds("another service's secret key, of some length").token(7),  # made with another key
        *(_flipped(token, bit) for bit in (0, 63, 64, 100, 127)),  # in the id's half and in the check half
    ]
    for value in values:
        response = client.get(f"{account}/images/events", headers={**owner, "Last-Event-ID": value.encode("latin-1")})
        assert response.status_code == 400, (value, response.text)
        body = response.json()
        assert body["code"] == "InvalidLastEventId", body
        assert body["message"].startswith("Last-Event-ID must be the id of an event this service sent"), body
        assert "leave it out" in body["message"], body
        response = client.get(f"{account}/images/events", params={"lastEventId": value}, headers=owner)
        assert response.status_code == 400, response.text
        assert response.json()["message"].startswith("lastEventId must be the id of an event this service sent")


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "a\u0000b"])
def test_text_no_column_can_hold_is_a_400_naming_the_field(
    client: TestClient, owner: dict[str, str], account: str, text: str
) -> None:
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    cases = [
        ("models", model_body(description=text), "description"),
        ("models", model_body(tags=["ok", text]), "tags"),
        ("models", model_body(url=f"https://example.com/{text}"), "url"),
        ("manifests", {**seed_manifest(model_id), "description": text}, "description"),
        ("manifests", {**seed_manifest(model_id), "modelIds": [text]}, "modelIds"),
        ("images", {"name": "img", "manifestId": text}, "manifestId"),
        ("images", {"name": "img", "manifestId": "x", "description": text}, "description"),
        ("webhooks", {"url": "https://hooks.example.com/x", "description": text}, "description"),
    ]
    for path, body, field in cases:
        response = _post(client, f"{account}/{path}", body, owner)
        assert response.status_code == 400, (path, field, response.text)
        assert any(d["message"].startswith(f"{field}: ") for d in response.json()["details"]), response.text
    refused = client.put(
        "/api/subscriptions/sub-1/resourceGroups/rg-1/accounts/acct-bad-text",
        content=json.dumps({"location": text, "sku": {"name": "S1"}}),
        headers={**owner, "Content-Type": "application/json"},
    )
    assert refused.status_code == 400 and "location: " in refused.text
    assert [m["id"] for m in client.get(f"{account}/models", headers=owner).json()["value"]] == [model_id]


def test_a_nul_in_a_query_or_path_parameter_is_a_400_naming_it(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    for path, param in [
        ("models?name=a%00b", "name"),
        ("models?tag=%00", "tag"),
        ("manifests?manifestName=%00", "manifestName"),
        ("images?manifestName=x%00", "manifestName"),
        ("models/%00", "modelId"),
        ("images/a%00b/log", "imageId"),
        ("models?api-version=x%00", "api-version"),  # named as a NUL, not echoed as a version
    ]:
        response = client.get(f"{account}/{path}", headers=owner)
        assert response.status_code == 400, response.text
        assert f"parameter '{param}' must not contain NUL" in response.json()["message"]


def test_a_huge_log_range_is_past_the_log(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    image = client.post(f"{account}/images", json={"name": "img", "manifestId": manifest_id}, headers=owner).json()
    response = client.get(f"{account}/images/{image['Id']}/log", headers={**owner, "Range": f"bytes={'9' * 5000}-"})
    assert response.status_code == 416, response.text


@pytest.mark.parametrize("name", ["..", ".", "a/b", "a\\b", "../1", "/etc"])
def test_a_name_that_is_not_one_path_segment_is_refused(
    client: TestClient, owner: dict[str, str], account: str, name: str
) -> None:
    # It would land at models/<name>/<version> in the image: models/../1 is outside models/.
    response = client.post(f"{account}/models", json=model_body(name=name), headers=owner)
    assert response.status_code == 400, response.text
    assert response.json()["details"][0]["message"].startswith("name: must "), response.text
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    manifest = seed_manifest(model_id)
    for body, field in [
        ({**manifest, "name": name}, "name"),
        ({**manifest, "assets": [{**manifest["assets"][0], "id": name}]}, "assets[0].id"),
        ({**manifest, "driverProgram": name}, "driverProgram"),
    ]:
        response = client.post(f"{account}/manifests", json=body, headers=owner)
        assert response.status_code == 400, response.text
        assert any(d["message"].startswith(f"{field}: ") for d in response.json()["details"]), response.text
    response = client.post(f"{account}/images", json={"name": name, "manifestId": "x"}, headers=owner)
    assert response.status_code == 400 and response.json()["details"][0]["message"].startswith("name: ")
    assert [m["name"] for m in client.get(f"{account}/models", headers=owner).json()["value"]] == ["housing.model"]


def test_the_seeds_names_are_still_names(client: TestClient, owner: dict[str, str], account: str) -> None:
    for name in ("sklearn_regression_model.pkl", "mymodel", "housing.model", "...", ".hidden", "a..b"):
        response = client.post(f"{account}/models", json=model_body(name=name), headers=owner)
        assert response.status_code == 200, response.text


def test_an_error_that_quotes_unencodable_input_still_renders() -> None:
    response = error_response(BadRequest("scope 'x\udfffy' is not valid"))
    assert response.status_code == 400
    assert json.loads(response.body)["message"] == "scope 'x\udfffy' is not valid"


def test_a_body_that_nests_too_deeply_is_a_400_not_a_500(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    nested: object = "x"
    for _ in range(900):
        nested = [nested]
    response = client.post(f"{account}/models", json=model_body(tags=nested), headers=owner)
    assert response.status_code == 400, response.text
    assert "nests deeper than" in response.text
