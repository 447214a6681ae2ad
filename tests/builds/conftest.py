"""A queued build in a fresh account, for the tests of the build's moves."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.orm import Session

from app.orm import Account, Image, Manifest
from app.orm.base import utcnow


@pytest.fixture()
def image(db: Session) -> Image:
    account = Account(
        subscription_id="s",
        resource_group="rg",
        name=f"a{uuid.uuid4().hex[:8]}",
        location="x",
        sku_name="S1",
        sku_capacity=1,
    )
    db.add(account)
    db.flush()
    manifest = Manifest(
        account_id=account.id,
        name="m",
        version=1,
        driver_program="score",
        model_type="Registered",
        runtime_type="Python",
        webservice_type="Realtime",
    )
    db.add(manifest)
    db.flush()
    row = Image(
        account_id=account.id,
        manifest_id=manifest.id,
        name="i",
        version=1,
        image_type="Docker",
        builder="docker",
        state="NotStarted",
        published_at=utcnow(),
    )
    db.add(row)
    db.flush()
    return row
