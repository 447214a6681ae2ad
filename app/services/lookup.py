"""Finding one resource of an account by the id a client sent."""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.errors import NotFound
from app.services.accounts import AccountRef

Row = TypeVar("Row")


def parse_uuid(value: str) -> uuid.UUID | None:
    """The UUID ``value`` spells, or None: a malformed id is simply not found."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def get_in_account(
    session: Session, entity: type[Row], account: AccountRef, resource_id: str, *, kind: str, options: Any = ()
) -> Row:
    """The ``entity`` row with this id in ``account``, or a 404 naming ``kind``."""
    parsed = parse_uuid(resource_id)
    row = session.get(entity, parsed, options=list(options)) if parsed else None
    if row is None or row.account_id != account.id:  # type: ignore[attr-defined]
        raise not_found(kind, resource_id)
    return row


def not_found(kind: str, resource_id: str) -> NotFound:
    """The 404 for a ``kind`` id that is not in the caller's account (or anywhere)."""
    return NotFound(
        f"{kind} '{resource_id}' was not found in this account", code=f"{kind[0].upper()}{kind[1:]}NotFound"
    )
