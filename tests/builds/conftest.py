"""A queued build in a fresh account, for the tests of the build's moves."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from app.orm import Image
from tests.factories import new_image_row


@pytest.fixture()
def image(db: Session) -> Image:
    return new_image_row(db)
