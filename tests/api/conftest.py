"""Fixtures of the API tests: an Owner's headers and a fresh account."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.factories import Callers, new_account


@pytest.fixture()
def owner(callers: Callers) -> dict[str, str]:
    return callers.headers()


@pytest.fixture()
def account(client: TestClient, owner: dict[str, str]) -> str:
    return new_account(client, owner)
