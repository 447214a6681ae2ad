"""ETags and 304s on the API's GETs, and Retry-After while a build is unfinished: cheap polling."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.builds import CreationState
from app.builds.events import record_state_changes
from app.orm import Image
from tests.api.test_images import _create


def test_an_unchanged_image_answers_304_until_its_state_changes(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, db: Session
) -> None:
    created = _create(client, account, owner, manifest_id).json()
    url = f"{account}/images/{created['Id']}"
    first = client.get(url, headers=owner)
    assert first.status_code == 200
    etag = first.headers["ETag"]
    assert etag.startswith('"') and first.headers["Cache-Control"] == "no-cache"
    assert first.headers["Retry-After"] == "2"  # NotStarted: poll again in a moment

    same = client.get(url, headers={**owner, "If-None-Match": etag})
    assert same.status_code == 304 and same.content == b""
    assert same.headers["ETag"] == etag and "x-ms-request-id" in same.headers
    assert client.get(url, headers={**owner, "If-None-Match": f'"other", W/{etag}'}).status_code == 304

    image = db.get(Image, uuid.UUID(created["Id"]))
    image.state = CreationState.SUCCEEDED.value
    db.flush()
    record_state_changes(db, [image.id])  # as every code path that moves a build does
    changed = client.get(url, headers={**owner, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["CreationState"] == "Succeeded"
    assert changed.headers["ETag"] != etag
    assert "Retry-After" not in changed.headers  # finished: nothing to wait for


def test_lists_and_operations_are_tagged_and_errors_are_not(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    created = _create(client, account, owner, manifest_id)
    listed = client.get(f"{account}/images", headers=owner)
    assert (
        client.get(f"{account}/images", headers={**owner, "If-None-Match": listed.headers["ETag"]}).status_code == 304
    )
    operation = client.get(created.headers["Operation-Location"], headers=owner)
    assert operation.headers["Retry-After"] == "2" and "ETag" in operation.headers
    missing = client.get(f"{account}/images/00000000-0000-0000-0000-000000000000", headers=owner)
    assert missing.status_code == 404 and "ETag" not in missing.headers
    # A caller without access never learns a tag: the 401 comes first.
    assert client.get(f"{account}/images", headers={"If-None-Match": listed.headers["ETag"]}).status_code == 401
