"""Idempotency-Key handling: a retried POST gets the first answer instead of a second resource.

The key is claimed by inserting its row first, in the same transaction as the work, so a
concurrent retry waits on the unique index until the first one commits, then replays it.
The caller and the request are kept as keyed digests (``Sealer.digest``): a body's secrets (a
registry password) are not in the table in a form a fast hash would let anyone guess back.
Rows past the TTL are deleted by the workers' periodic pass (``forget_expired``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import BadRequest, ServiceError
from app.orm import IdempotencyRecord
from app.orm.base import utcnow
from app.sealing import Sealer

MAX_KEY_LENGTH = 255
FORGET_BATCH = 5000  # rows deleted a pass: a backlog drains over several, none holds long locks


class IdempotencyKeyReused(ServiceError):
    status_code = 422
    code = "IdempotencyKeyReused"


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]
    replayed: bool


def owner(sealer: Sealer, issuer: str, subject: str) -> str:
    """Who sent a key: a digest of the caller's issuer and subject (unambiguous, of fixed length)."""
    return sealer.digest(json.dumps([issuer, subject]).encode())


def fingerprint(sealer: Sealer, method: str, path: str, payload: Any) -> str:
    """A keyed digest of what was asked, so a key reused for a different request is caught."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return sealer.digest(canonical.encode())


def forget_expired(session: Session, *, ttl_seconds: int) -> int:
    """Delete up to ``FORGET_BATCH`` records older than the TTL (a key is never replayed past it);
    how many went."""
    expired = (
        select(IdempotencyRecord.id)
        .where(IdempotencyRecord.created_at < utcnow() - timedelta(seconds=ttl_seconds))
        .limit(FORGET_BATCH)
    )
    gone = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id.in_(expired.scalar_subquery())))
    return gone.rowcount


def run_idempotent(
    session: Session,
    *,
    owner: str,
    key: str | None,
    request_fingerprint: str,
    ttl_seconds: int,
    action: Callable[[], tuple[int, dict[str, Any]]],
) -> StoredResponse:
    """Run ``action`` once per (owner, key); a repeat returns what the first run answered."""
    if key is None:
        status_code, body = action()
        return StoredResponse(status_code, body, replayed=False)
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters",
            code="InvalidIdempotencyKey",
        )
    session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.owner == owner,
            IdempotencyRecord.key == key,
            IdempotencyRecord.created_at < utcnow() - timedelta(seconds=ttl_seconds),
        )
    )
    record = IdempotencyRecord(owner=owner, key=key, fingerprint=request_fingerprint, status_code=0, response_body={})
    try:
        with session.begin_nested():
            session.add(record)
            session.flush()
    except IntegrityError:
        return _replay(session, owner=owner, key=key, request_fingerprint=request_fingerprint)
    status_code, body = action()
    record.status_code, record.response_body = status_code, body
    session.flush()
    return StoredResponse(status_code, body, replayed=False)


def _replay(session: Session, *, owner: str, key: str, request_fingerprint: str) -> StoredResponse:
    stored = session.scalars(
        select(IdempotencyRecord).where(IdempotencyRecord.owner == owner, IdempotencyRecord.key == key)
    ).one()
    if stored.fingerprint != request_fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was already used for a different request; use a new key")
    return StoredResponse(stored.status_code, stored.response_body, replayed=True)
