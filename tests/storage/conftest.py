"""Fixtures for the storage backends: a container of Azurite's for ``azure``."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest


@pytest.fixture(scope="session")
def azure_container(azure_connection_string: str) -> Iterator[str]:
    """A container of this test run's own, removed at its end."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob import BlobServiceClient

    name = f"mms-test-{uuid4().hex[:12]}"
    yield name
    with BlobServiceClient.from_connection_string(azure_connection_string) as service:
        try:
            service.delete_container(name)
        except ResourceNotFoundError:
            pass
