"""Fixtures of the API tests: an Owner's headers and a fresh account."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.api.test_manifests import seed_manifest
from tests.factories import Callers, model_body, new_account


@pytest.fixture()
def owner(callers: Callers) -> dict[str, str]:
    return callers.headers()


@pytest.fixture()
def account(client: TestClient, owner: dict[str, str]) -> str:
    return new_account(client, owner)


@pytest.fixture()
def manifest_id(client: TestClient, owner: dict[str, str], account: str) -> str:
    """A manifest of the seed's shape, with a registered model, in ``account``."""
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    return client.post(f"{account}/manifests", json=seed_manifest(model_id), headers=owner).json()["id"]
