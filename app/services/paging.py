"""Keyset paging: opaque ``$skipToken`` values that stay stable while rows are added."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.errors import BadRequest
from app.schemas.common import unstorable

Row = TypeVar("Row")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_VERSION = 2**31 - 1  # an INTEGER column
MAX_ID = 2**63 - 1  # a BIGINT column


def page_size(count: int | None) -> int:
    """The page size asked for, or a 400 when it is out of range."""
    if count is None:
        return DEFAULT_PAGE_SIZE
    if not 1 <= count <= MAX_PAGE_SIZE:
        raise BadRequest(f"count must be between 1 and {MAX_PAGE_SIZE}", code="InvalidCount")
    return count


def encode_token(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _fits(value: Any, kind: type, max_int: int) -> bool:
    # A forged token must not carry what the database cannot compare (a 30-digit number, a NUL).
    if kind is int:
        return type(value) is int and 0 <= value <= max_int
    return isinstance(value, str) and len(value) <= 1024 and unstorable(value) is None


def decode_token(token: str | None, *, fields: dict[str, type], max_int: int = MAX_ID) -> dict[str, Any] | None:
    """The position a token names, checked against the fields it must hold; 400 if it is bad."""
    if token is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        position = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        position = None
    if (
        not isinstance(position, dict)
        or set(position) != set(fields)
        or not all(_fits(position[name], kind, max_int) for name, kind in fields.items())
    ):
        raise invalid_skip_token()
    return position


def invalid_skip_token() -> BadRequest:
    """The 400 of a ``$skipToken`` the service did not make."""
    return BadRequest(
        "$skipToken is not valid; use the nextLink of the previous page as it is", code="InvalidSkipToken"
    )


def page_by_name_and_version(
    session: Session, query: Select[tuple[Row]], entity: Any, *, count: int | None, skip_token: str | None
) -> tuple[list[Row], str | None]:
    """One page of a versioned resource by name, newest version first, and the next page's token.

    The token names the last row served, so rows added meanwhile neither repeat nor shift a page.
    """
    limit = page_size(count)
    position = decode_token(skip_token, fields={"n": str, "v": int}, max_int=MAX_VERSION)
    if position is not None:
        query = query.where(
            or_(
                entity.name > position["n"],
                and_(entity.name == position["n"], entity.version < position["v"]),
            )
        )
    rows = list(session.scalars(query.order_by(entity.name, entity.version.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_token({"n": last.name, "v": last.version})
