"""The model registry through HTTP: the seed's shapes, versions, validation, paging."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.context import ServiceContext
from tests.factories import model_body, new_account


def test_seed_registration_returns_the_seed_shape(client: TestClient, owner: dict[str, str], account: str) -> None:
    response = client.post(f"{account}/models", json=model_body(), headers=owner)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {"id", "name", "version", "description", "url", "tags", "mimeType", "createdAt"} <= set(body)
    assert body["name"] == "housing.model"
    assert body["version"] == 1
    assert body["tags"] == ["myTag"]
    assert body["mimeType"] == "application/zip"
    assert body["unpack"] is True
    assert body["createdAt"].endswith("Z")
    uuid.UUID(body["id"])
    fetched = client.get(f"{account}/models/{body['id']}", headers=owner)
    assert fetched.status_code == 200
    assert fetched.json() == body


def test_each_registration_takes_the_next_version_and_deleted_versions_stay_used(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    ids = []
    for expected in (1, 2, 3):
        response = client.post(f"{account}/models", json=model_body(), headers=owner)
        assert response.json()["version"] == expected
        ids.append(response.json()["id"])
    other = client.post(f"{account}/models", json=model_body(name="other"), headers=owner)
    assert other.json()["version"] == 1

    assert client.delete(f"{account}/models/{ids[2]}", headers=owner).status_code == 204
    assert client.get(f"{account}/models/{ids[2]}", headers=owner).status_code == 404
    again = client.post(f"{account}/models", json=model_body(), headers=owner)
    assert again.json()["version"] == 4


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("name", "x" * 33, "name: must be 1-32 characters"),
        ("name", "has space", "name: must be 1-32 characters"),
        ("name", "", "name: must be 1-32 characters"),
        ("tags", ["t" * 31], "tags[0]"),
        ("tags", "notalist", "tags"),
        ("description", "d" * 201, "description"),
        ("url", "ftp://example.com/model.zip", "url: must be an http:// or https:// URL"),
        ("url", "not a url", "url"),
        ("url", "https://example.com:99999/m.zip", "url: has an invalid port"),
        ("mimeType", "zip", "mimeType: must be a MIME type"),
        ("mimeType", None, "mimeType"),
        ("unpack", "perhaps", "unpack"),
        ("unpack", "yes", "unpack: must be true or false"),
        ("unpack", "1", "unpack: must be true or false"),
        ("description", "nul\x00byte", "description: must not contain NUL"),
        ("description", "bell\x07", "description: must not contain control characters"),
        ("sha256", "abc", "sha256"),
    ],
)
def test_bad_fields_get_a_400_that_names_them(
    client: TestClient, owner: dict[str, str], account: str, field: str, value: object, fragment: str
) -> None:
    body = model_body(**{field: value})
    if value is None:
        del body[field]
    response = client.post(f"{account}/models", json=body, headers=owner)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["code"] == "ValidationError"
    assert error["statusCode"] == 400
    assert any(fragment in d["message"] for d in error["details"]), error
    assert client.get(f"{account}/models", headers=owner).json()["value"] == []


def test_a_body_that_is_not_json_gets_a_400(client: TestClient, owner: dict[str, str], account: str) -> None:
    response = client.post(
        f"{account}/models", content=b"{not json", headers={**owner, "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["message"]


@pytest.mark.parametrize("tags", [[], ["b", "a", "c"]], ids=["no tags", "three tags"])
def test_a_get_reads_the_model_with_its_tags_in_one_statement(
    client: TestClient, owner: dict[str, str], account: str, app_context: ServiceContext, tags: list[str]
) -> None:
    created = client.post(f"{account}/models", json=model_body(tags=tags), headers=owner).json()
    assert created["tags"] == tags
    selects: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(app_context.engine, "before_cursor_execute", count)
    try:
        fetched = client.get(f"{account}/models/{created['id']}", headers=owner)
    finally:
        event.remove(app_context.engine, "before_cursor_execute", count)
    assert fetched.json() == created  # the tags in the order registered
    # Roles (MMS_AUTH_CACHE_SECONDS is 0 in the tests), the account, the model with its tags.
    assert len(selects) == 3, "\n\n".join(selects)


@pytest.mark.parametrize("tags", [[], ["b", "a", "c"]], ids=["no tags", "three tags"])
def test_a_registration_writes_in_one_statement_on_postgresql(
    client: TestClient, owner: dict[str, str], account: str, app_context: ServiceContext, tags: list[str]
) -> None:
    """The counter's claim, the row and its tags: one round trip on PostgreSQL (data-modifying
    CTEs), three on SQLite, which has none (issue 20)."""
    writes: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # type: ignore[no-untyped-def]
        if statement.lstrip().split(None, 1)[0].upper() in {"INSERT", "UPDATE", "DELETE", "WITH"}:
            writes.append(statement)  # not the tests' SAVEPOINTs

    event.listen(app_context.engine, "before_cursor_execute", count)
    try:
        created = [client.post(f"{account}/models", json=model_body(tags=tags), headers=owner) for _ in range(2)]
    finally:
        event.remove(app_context.engine, "before_cursor_execute", count)
    assert [r.status_code for r in created] == [200, 200]
    assert [r.json()["version"] for r in created] == [1, 2]
    for response in created:
        assert response.json()["tags"] == tags
        assert client.get(f"{account}/models/{response.json()['id']}", headers=owner).json() == response.json()
    postgresql = app_context.engine.dialect.name == "postgresql"
    per_registration = 1 if postgresql else (3 if tags else 2)
    assert len(writes) == 2 * per_registration, "\n\n".join(writes)


def test_unknown_and_foreign_ids_are_404(client: TestClient, owner: dict[str, str], account: str) -> None:
    other = new_account(client, owner)
    model = client.post(f"{other}/models", json=model_body(), headers=owner).json()
    for model_id in (str(uuid.uuid4()), "not-a-uuid", model["id"]):
        response = client.get(f"{account}/models/{model_id}", headers=owner)
        assert response.status_code == 404
        assert response.json()["code"] == "ModelNotFound"
    assert client.delete(f"{account}/models/{model['id']}", headers=owner).status_code == 404


def test_list_filters_and_pages_stably(client: TestClient, owner: dict[str, str], account: str) -> None:
    for name, tags in [("a", ["x"]), ("b", ["y"]), ("a", ["y"]), ("c", []), ("b", ["x", "y"])]:
        assert client.post(f"{account}/models", json=model_body(name=name, tags=tags), headers=owner).status_code == 200

    def collect(query: str) -> list[tuple[str, int]]:
        seen, url = [], f"{account}/models?{query}"
        while url:
            page = client.get(url, headers=owner)
            assert page.status_code == 200, page.text
            seen += [(m["name"], m["version"]) for m in page.json()["value"]]
            url = page.json()["nextLink"]
        return seen

    assert collect("count=2") == [("a", 2), ("a", 1), ("b", 2), ("b", 1), ("c", 1)]
    assert collect("count=1&name=b") == [("b", 2), ("b", 1)]
    assert collect("tag=y") == [("a", 2), ("b", 2), ("b", 1)]
    assert collect("tag=nothing") == []

    first = client.get(f"{account}/models?count=2", headers=owner).json()
    # A registration after the first page was read neither repeats nor skips anything.
    client.post(f"{account}/models", json=model_body(name="a"), headers=owner)
    rest = client.get(first["nextLink"], headers=owner).json()
    assert [(m["name"], m["version"]) for m in rest["value"]] == [("b", 2), ("b", 1)]
    last = client.get(rest["nextLink"], headers=owner).json()
    assert [(m["name"], m["version"]) for m in last["value"]] == [("c", 1)]
    assert last["nextLink"] is None


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("False", False), ("TRUE", True), (False, False)])
def test_unpack_takes_the_seeds_strings(
    client: TestClient, owner: dict[str, str], account: str, value: object, expected: bool
) -> None:
    response = client.post(f"{account}/models", json=model_body(unpack=value), headers=owner)
    assert response.status_code == 200, response.text
    assert response.json()["unpack"] is expected


@pytest.mark.parametrize("query", ["count=0", "count=5000", "count=abc", "$skipToken=garbage", "$skipToken=e30"])
def test_bad_paging_parameters_get_a_400(client: TestClient, owner: dict[str, str], account: str, query: str) -> None:
    response = client.get(f"{account}/models?{query}", headers=owner)
    assert response.status_code == 400, response.text


def test_idempotency_key_replays_the_first_registration(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    headers = {**owner, "Idempotency-Key": "register-housing-1"}
    first = client.post(f"{account}/models", json=model_body(), headers=headers)
    retry = client.post(f"{account}/models", json=model_body(), headers=headers)
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert len(client.get(f"{account}/models", headers=owner).json()["value"]) == 1

    reused = client.post(f"{account}/models", json=model_body(description="other"), headers=headers)
    assert reused.status_code == 422
    assert reused.json()["code"] == "IdempotencyKeyReused"
    fresh = client.post(f"{account}/models", json=model_body(), headers={**owner, "Idempotency-Key": "k2"})
    assert fresh.json()["version"] == 2


def test_unknown_routes_and_methods_keep_the_error_shape(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    missing = client.get("/api/nothing-here", headers=owner)
    assert missing.status_code == 404
    assert set(missing.json()) == {"code", "message", "statusCode", "details"}
    wrong_method = client.patch(f"{account}/models", headers=owner)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["statusCode"] == 405


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
