"""A new service on a built image in a fresh account, for the tests of the service's moves."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app.orm import Service
from tests.factories import new_service_row


@pytest.fixture()
def service(db: Session) -> Service:
    return new_service_row(db)
