"""The prebuilt base images the API lists."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.services.base_images import record_base_image
from tests.factories import Callers, new_account


def test_base_images_are_listed_newest_first(client: TestClient, callers: Callers, db: Session) -> None:
    record_base_image(db, reference="127.0.0.1:5000/mms/inference-base:py3.11-20260101", python_version="3.11")
    record_base_image(db, reference="127.0.0.1:5000/mms/inference-base:py3.11-20261101", python_version="3.11")
    owner = callers.headers()
    listed = client.get(f"{new_account(client, owner)}/baseImages", headers=owner).json()["value"]
    available = [b["reference"] for b in listed if b["available"]]
    assert available[:2] == [
        "127.0.0.1:5000/mms/inference-base:py3.11-20261101",
        "127.0.0.1:5000/mms/inference-base:py3.11-20260101",
    ]
    assert any(b["variant"] == "gpu" and not b["available"] for b in listed)
