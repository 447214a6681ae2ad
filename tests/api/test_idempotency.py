"""Every POST that creates something, sent again with its Idempotency-Key: the first answer,
replayed (its Operation-Location too), and still one resource; on PostgreSQL and SQLite."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.orm import IdempotencyRecord
from app.orm.base import utcnow
from app.schemas.images import ImageCreate
from tests.api.test_manifests import seed_manifest
from tests.api.test_services import built_image
from tests.factories import Callers, model_body

Create = tuple[str, Callable[[str], dict[str, Any]], str]  # route, body for a name, the answer's id member


@pytest.fixture()
def creates(
    client: TestClient, db: Session, account: str, owner: dict[str, str], manifest_id: str
) -> dict[str, Create]:
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    image_id = built_image(client, db, account, owner, manifest_id)
    return {
        "models": ("models", lambda name: model_body(name=name), "id"),
        "manifests": ("manifests", lambda name: seed_manifest(model_id, name=name), "id"),
        "images": ("images", lambda name: {"name": name, "manifestId": manifest_id}, "Id"),
        "services": ("services", lambda name: {"name": name, "imageId": image_id}, "id"),
    }


def _listed(client: TestClient, account: str, owner: dict[str, str], route: str, name: str) -> list[dict[str, Any]]:
    found = client.get(f"{account}/{route}", headers=owner).json()["value"]
    return [item for item in found if item.get("name", item.get("Name")) == name]


@pytest.mark.parametrize("kind", ["models", "manifests", "images", "services"])
def test_a_create_sent_again_with_its_key_is_answered_as_the_first_and_makes_nothing_more(
    client: TestClient, account: str, owner: dict[str, str], creates: dict[str, Create], kind: str
) -> None:
    route, body, id_member = creates[kind]
    keyed = {**owner, "Idempotency-Key": f"create-{kind}-1"}
    first = client.post(f"{account}/{route}", json=body("once"), headers=keyed)
    assert first.status_code in (200, 202), first.text
    assert "Idempotent-Replayed" not in first.headers

    again = client.post(f"{account}/{route}", json=body("once"), headers=keyed)
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    if first.status_code == 202:  # the operation to poll is the first one's
        assert again.headers["Operation-Location"] == first.headers["Operation-Location"]
        assert client.get(again.headers["Operation-Location"], headers=owner).status_code == 200
    assert [item[id_member] for item in _listed(client, account, owner, route, "once")] == [first.json()[id_member]]

    other_body = client.post(f"{account}/{route}", json=body("other"), headers=keyed)
    assert other_body.status_code == 422, other_body.text
    assert other_body.json()["code"] == "IdempotencyKeyReused"
    assert _listed(client, account, owner, route, "other") == []

    new_key = client.post(f"{account}/{route}", json=body("other"), headers={**owner, "Idempotency-Key": "k2"})
    assert new_key.status_code == first.status_code and new_key.json()[id_member] != first.json()[id_member]


def test_a_key_is_the_callers_own_another_callers_same_key_is_a_request_of_its_own(
    client: TestClient, callers: Callers, account: str, owner: dict[str, str]
) -> None:
    """Replaying someone else's answer would show it to a caller who never made it."""
    first = client.post(f"{account}/models", json=model_body(), headers={**owner, "Idempotency-Key": "shared"})
    other = {**callers.headers("Contributor"), "Idempotency-Key": "shared"}
    second = client.post(f"{account}/models", json=model_body(), headers=other)
    assert second.status_code == 200, second.text
    assert "Idempotent-Replayed" not in second.headers
    assert (first.json()["version"], second.json()["version"]) == (1, 2)


def test_a_key_past_its_lifetime_is_a_new_request_before_the_workers_delete_its_row(
    client: TestClient, db: Session, account: str, owner: dict[str, str]
) -> None:
    """The workers' pass deletes expired rows in batches, later: until then the row must not
    replay, nor refuse the key with another body."""
    keyed = {**owner, "Idempotency-Key": "lapsing"}
    first = client.post(f"{account}/models", json=model_body(), headers=keyed)
    assert first.status_code == 200, first.text
    lifetime = timedelta(seconds=Settings().idempotency_ttl_seconds)
    db.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.key == "lapsing")
        .values(created_at=utcnow() - lifetime - timedelta(seconds=5))
    )
    db.flush()

    anew = client.post(f"{account}/models", json=model_body(description="later"), headers=keyed)
    assert anew.status_code == 200, anew.text
    assert "Idempotent-Replayed" not in anew.headers
    assert anew.json()["version"] == 2
    again = client.post(f"{account}/models", json=model_body(description="later"), headers=keyed)
    assert again.headers["Idempotent-Replayed"] == "true" and again.json() == anew.json()
    assert db.scalar(select(func.count()).where(IdempotencyRecord.key == "lapsing")) == 1


def test_a_keyed_request_refused_leaves_its_key_free(client: TestClient, account: str, owner: dict[str, str]) -> None:
    """The key's row rolls back with the refused work: the next request with it is a new one, not
    a replay of an answer that was never stored."""
    keyed = {**owner, "Idempotency-Key": "refused-first"}
    refused = client.post(f"{account}/models", json=model_body(url="ftp://example.com/m.pkl"), headers=keyed)
    assert refused.status_code == 400, refused.text
    made = client.post(f"{account}/models", json=model_body(), headers=keyed)
    assert made.status_code == 200, made.text
    assert "Idempotent-Replayed" not in made.headers and made.json()["version"] == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "line\nbreak"])
def test_a_malformed_key_is_a_400_naming_the_header_and_makes_nothing(
    client: TestClient, account: str, owner: dict[str, str], manifest_id: str, key: str
) -> None:
    response = client.post(
        f"{account}/images", json={"name": "img", "manifestId": manifest_id}, headers={**owner, "Idempotency-Key": key}
    )
    assert response.status_code == 400, response.text
    assert "Idempotency-Key" in response.json()["message"]
    assert client.get(f"{account}/images", headers=owner).json()["value"] == []


def test_the_stored_key_names_neither_the_caller_nor_the_body_in_a_guessable_form(
    client: TestClient, db: Session, account: str, owner: dict[str, str], manifest_id: str
) -> None:
    """A body may carry a registry password: the table keeps keyed digests, not plain hashes."""
    body = {"name": "img", "manifestId": manifest_id}
    response = client.post(f"{account}/images", json=body, headers={**owner, "Idempotency-Key": "digests"})
    assert response.status_code == 202, response.text
    record = db.scalars(select(IdempotencyRecord).where(IdempotencyRecord.key == "digests")).one()
    path = f"{account}/images"
    asked = ["POST", path, ImageCreate.model_validate(body).model_dump(mode="json")]
    plain = json.dumps(asked, sort_keys=True, separators=(",", ":")).encode()
    assert record.fingerprint != hashlib.sha256(plain).hexdigest()
    assert len(record.fingerprint) == len(record.owner) == 64
    assert "sub-" not in record.owner and "http" not in record.owner


@pytest.mark.parametrize("ttl", [0, 59, 31 * 86400])
def test_a_key_lifetime_out_of_bounds_is_refused_at_start(ttl: int) -> None:
    with pytest.raises(ValidationError, match="idempotency_ttl_seconds"):
        Settings(idempotency_ttl_seconds=ttl)
