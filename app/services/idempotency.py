"""Idempotency-Key handling: a retried POST gets the first answer instead of a second resource.

The key is claimed by inserting its row first, in the same transaction as the work, so a
concurrent retry waits on the unique index until the first one commits, then replays it.
The caller and the request are kept as keyed digests (``Sealer.digest``): a body's secrets (a
registry password) are not in the table in a form a fast hash would let anyone guess back.
Rows past the TTL are deleted by the workers' periodic pass (``forget_expired``).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, Insert, Integer, Uuid, bindparam, delete, exists, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningInsert

from app.errors import BadRequest, ServiceError
from app.orm import IdempotencyRecord
from app.orm.base import utcnow
from app.sealing import Sealer
from app.writes import Writes

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
    cutoff = utcnow() - timedelta(seconds=ttl_seconds)
    expired = select(IdempotencyRecord.id).where(IdempotencyRecord.created_at < cutoff).limit(FORGET_BATCH)
    # created_at again outside: a row taken over while this waited on it (a new claim of its
    # key, _claim_statement) is checked anew as it now is, and kept.
    gone = session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.id.in_(expired.scalar_subquery()), IdempotencyRecord.created_at < cutoff
        )
    )
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
    """Run ``action`` once per (owner, key); a repeat returns what the first run answered.

    Three statements around the action's own: the key's claim (one upsert that also takes over
    a row past the TTL the workers have not deleted yet), the answer stored in the claimed row,
    and the COMMIT. Core statements, not the ORM's unit of work and a savepoint, which cost a
    keyed registration more than twice an unkeyed one (issue 20)."""
    if key is None:
        status_code, body = action()
        return StoredResponse(status_code, body, replayed=False)
    _check(key)
    if session.new or session.dirty or session.deleted:
        session.flush()  # what Session.execute's autoflush would do: rows added before go first
    connection = session.connection()
    claimed = connection.execute(
        _claim_statement(connection.dialect.name), _claim_parameters(owner, key, request_fingerprint, ttl_seconds)
    ).scalar()
    if claimed is None:  # a live row: answered before, or by a request that just committed
        return _replay(session, owner=owner, key=key, request_fingerprint=request_fingerprint)
    status_code, body = action()
    connection.execute(_STORE_ANSWER, {"record_id": claimed, "status_code": status_code, "response_body": body})
    return StoredResponse(status_code, body, replayed=False)


async def run_statement_once(
    writes: Writes,
    *,
    owner: str,
    key: str | None,
    request_fingerprint: str,
    ttl_seconds: int,
    statement: Insert,
    statement_once: Insert,
    prepare: Callable[[], Mapping[str, object]],
    answer: Callable[[Sequence[Sequence[Any]]], tuple[int, dict[str, Any]]],
) -> StoredResponse:
    """``run_idempotent`` for a create that is one prebuilt statement (a model's registration
    on PostgreSQL). ``prepare`` checks the request and gives the statement's parameters;
    ``answer`` builds the answer from its rows. Without a key ``statement`` runs alone. With
    one, the key's claim, ``statement_once`` (the same, made only if the claim took the key:
    ``CLAIMED``, with the claim's ``idempotency_record_id``) are sent together; then the answer
    is stored with the COMMIT. Two round trips on the event loop (``Writes.transaction``), where
    a session's transaction took five and a thread trip (issue 20). A key already answered makes
    nothing: its stored answer is read under the claim's lock (no workers' pass deletes it
    between) with the ROLLBACK, and replayed. So is it when the request is refused before it
    runs (a URL the policy no longer takes), as ``run_idempotent`` would."""
    if key is None:
        status_code, body = answer(await writes.alone(statement, prepare()))
        return StoredResponse(status_code, body, replayed=False)
    _check(key)
    claiming = _claim_parameters(owner, key, request_fingerprint, ttl_seconds)
    stored = (_STORED, {"owner": owner, "key": key, "live_since": claiming["expired_before"]})
    try:
        params = prepare()
    except ServiceError:
        [found] = await writes.transaction([stored], lambda rows: ([], True))
        if found:
            return _replayed(found[0], request_fingerprint)
        raise
    answered: list[tuple[int, dict[str, Any]]] = []

    def finish(rows: list[list[tuple[Any, ...]]]) -> tuple[list[tuple[Any, Mapping[str, object]]], bool]:
        claimed, made = rows
        if not claimed:  # a live row, locked by the claim: answered before, or by a request that just committed
            return [stored], False  # read it, and roll back (the registration held to the claim made nothing)
        status_code, body = answer(made)
        answered.append((status_code, body))
        return [(_STORE_ANSWER, {"record_id": claimed[0][0], "status_code": status_code, "response_body": body})], True

    once = {**params, "idempotency_record_id": claiming["id"]}
    rows = await writes.transaction([(_claim_statement(writes.dialect), claiming), (statement_once, once)], finish)
    if answered:
        [(status_code, body)] = answered
        return StoredResponse(status_code, body, replayed=False)
    return _replayed(rows[2][0], request_fingerprint)


def _check(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable characters",
            code="InvalidIdempotencyKey",
        )


def _claim_parameters(owner: str, key: str, request_fingerprint: str, ttl_seconds: int) -> dict[str, object]:
    now = utcnow()
    return {
        "id": uuid.uuid4(),
        "owner": owner,
        "key": key,
        "fingerprint": request_fingerprint,
        "created_at": now,
        "expired_before": now - timedelta(seconds=ttl_seconds),
    }


@functools.cache
def _claim_statement(dialect: str) -> ReturningInsert:
    """Insert the key's row, answer not yet known, and return its id; or return nothing when a
    live row holds the key. A concurrent request with the same key waits on the unique index
    until the first one's transaction ends: it then replays a commit, or claims after a
    rollback. Built once: building it per request cost more than running it."""
    table = IdempotencyRecord.__table__
    excluded = {name: bindparam(name, type_=table.c[name].type) for name in ("id", "fingerprint", "created_at")}
    return (
        _UPSERTS[dialect](table)
        .values(
            **excluded,
            owner=bindparam("owner", type_=table.c.owner.type),
            key=bindparam("key", type_=table.c.key.type),
            status_code=0,
            response_body=_UNANSWERED,
        )
        .on_conflict_do_update(
            index_elements=[table.c.owner, table.c.key],
            # A row past the TTL is no key any more: the request is a new one. Its new id and
            # time keep a concurrent forget_expired from deleting it once this commits.
            set_={**excluded, "status_code": 0, "response_body": _UNANSWERED},
            where=table.c.created_at < bindparam("expired_before", type_=table.c.created_at.type),
        )
        .returning(table.c.id)
    )


_UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
_UNANSWERED = literal({}, JSON)
_STORE_ANSWER = (
    update(IdempotencyRecord.__table__)
    .where(IdempotencyRecord.__table__.c.id == bindparam("record_id", type_=Uuid))
    .values(
        status_code=bindparam("status_code", type_=Integer),
        response_body=bindparam("response_body", type_=IdempotencyRecord.__table__.c.response_body.type),
    )
)


_RECORDS = IdempotencyRecord.__table__
# A key's answer, while it lives.
_STORED = select(_RECORDS.c.fingerprint, _RECORDS.c.status_code, _RECORDS.c.response_body).where(
    _RECORDS.c.owner == bindparam("owner", type_=_RECORDS.c.owner.type),
    _RECORDS.c.key == bindparam("key", type_=_RECORDS.c.key.type),
    _RECORDS.c.created_at >= bindparam("live_since", type_=_RECORDS.c.created_at.type),
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Whether this transaction's claim took the key: a statement run once per key is held to it
# (models.REGISTER_ONCE), with the claim's record id as ``idempotency_record_id``.
CLAIMED = exists().where(_RECORDS.c.id == bindparam("idempotency_record_id", type_=_RECORDS.c.id.type))


def _replay(session: Session, *, owner: str, key: str, request_fingerprint: str) -> StoredResponse:
    # After a claim that found the key taken: its row is live, and locked by the claim.
    stored = session.execute(_STORED, {"owner": owner, "key": key, "live_since": _EPOCH}).one()
    return _replayed(stored, request_fingerprint)


def _replayed(stored: Sequence[Any], request_fingerprint: str) -> StoredResponse:
    fingerprint, status_code, body = stored
    if fingerprint != request_fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was already used for a different request; use a new key")
    return StoredResponse(status_code, body, replayed=True)
