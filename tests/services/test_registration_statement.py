"""A registration on PostgreSQL is one statement (``models.REGISTER``). The API runs it on the
event loop (app.writes.LoopWrites): alone, a transaction of its own committed as it ends, so a
name's version counter is locked only inside the database; with an Idempotency-Key, in one
transaction with the key's claim and answer. In a session (``register_model``) it is part of the
session's transaction. The sessions and pools here are the service's own, committed for real,
not the tests' joined ones."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.database import make_async_write_engine
from app.errors import ValidationFailed
from app.orm import Account, IdempotencyRecord, ModelVersion, RegisteredModel
from app.schemas.models import ModelCreate
from app.services import idempotency, models
from app.services.accounts import AccountRef
from app.writes import LoopWrites, ThreadWrites

pytestmark = pytest.mark.postgres_only

BODY = ModelCreate(name="housing.model", url="https://example.com/model.pkl", mimeType="application/zip")


@pytest.fixture()
def account(service_context: ServiceContext) -> Iterator[AccountRef]:
    """An account committed for real (the registrations commit), removed with its models after."""
    with service_context.session_factory.begin() as session:
        row = Account(
            subscription_id="s", resource_group="rg", name=f"a{uuid.uuid4().hex[:8]}", location="x", sku_name="S1"
        )
        row.sku_capacity = 1
        session.add(row)
        session.flush()
        ref = AccountRef.of(row)
    try:
        yield ref
    finally:
        with service_context.session_factory.begin() as session:
            session.execute(delete(ModelVersion).where(ModelVersion.account_id == ref.id))
            session.execute(delete(RegisteredModel).where(RegisteredModel.account_id == ref.id))
            session.execute(delete(Account).where(Account.id == ref.id))


@pytest.fixture()
def statements(service_context: ServiceContext) -> Iterator[list[tuple[str, bool]]]:
    """Each statement the engine sends (its first word) and whether it went in autocommit."""
    sent: list[tuple[str, bool]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        sent.append((statement.split()[0].upper(), bool(conn.connection.driver_connection.autocommit)))

    event.listen(service_context.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(service_context.engine, "before_cursor_execute", record)


def _versions(service_context: ServiceContext, account: AccountRef) -> list[int]:
    """What another connection sees committed."""
    with service_context.session_factory() as session:
        return sorted(session.scalars(select(ModelVersion.version).where(ModelVersion.account_id == account.id)))


def _on_the_loop(service_context: ServiceContext, body):  # type: ignore[no-untyped-def]
    """``body(writes)`` run with the API's own LoopWrites, on an event loop of its own."""

    async def main():  # type: ignore[no-untyped-def]
        writes = LoopWrites(
            make_async_write_engine(service_context.settings),
            threads=ThreadWrites(service_context.session_factory, "postgresql"),
        )
        try:
            return await body(writes)
        finally:
            await writes.close()

    return asyncio.run(main())


def test_a_registration_alone_is_one_statement_committed_as_it_ends(
    service_context: ServiceContext, account: AccountRef
) -> None:
    async def register(writes: LoopWrites) -> list[tuple[int, list[int]]]:
        seen = []
        for _ in (1, 2):
            made = models.registration(account, BODY, urls=service_context.url_policy, created_by=None)
            registered = made.registered(await writes.alone(models.REGISTER, made.parameters))
            seen.append((registered.version, _versions(service_context, account)))  # another connection's view
        return seen

    assert _on_the_loop(service_context, register) == [(1, [1]), (2, [1, 2])]


def test_a_registration_in_a_session_is_in_the_sessions_transaction(
    service_context: ServiceContext, account: AccountRef, statements: list[tuple[str, bool]]
) -> None:
    """An Idempotency-Key's record is written first: the two commit together or not at all."""
    with service_context.session_factory() as session:
        stored = idempotency.run_idempotent(
            session,
            owner="test",
            key=f"k-{uuid.uuid4()}",
            request_fingerprint="f",
            ttl_seconds=60,
            action=lambda: (
                200,
                {
                    "version": models.register_model(
                        session, account, BODY, urls=service_context.url_policy, created_by=None
                    ).version
                },
            ),
        )
        assert stored.body == {"version": 1}
        assert ("WITH", False) in statements and not any(autocommit for _, autocommit in statements)
        session.rollback()
    assert _versions(service_context, account) == []


def test_a_registration_refused_before_its_statement_leaves_nothing(
    service_context: ServiceContext, account: AccountRef, statements: list[tuple[str, bool]]
) -> None:
    expired = "https://acct.blob.core.windows.net/models/m.pkl?sv=2021-08-06&sp=r&se=2000-01-01T00:00:00Z&sig=c2ln"
    refused = BODY.model_copy(update={"url": expired})
    with service_context.session_factory() as session, pytest.raises(ValidationFailed):
        models.register_model(session, account, refused, urls=service_context.url_policy, created_by=None)
    assert statements == []
    with service_context.session_factory() as session:
        assert session.scalar(select(func.count()).where(RegisteredModel.account_id == account.id)) == 0


def _another_account(session: Session) -> Account:
    row = Account(
        subscription_id="s", resource_group="rg", name=f"b{uuid.uuid4().hex[:8]}", location="x", sku_name="S1"
    )
    row.sku_capacity = 1
    return row


def test_rows_pending_before_a_registration_commit_with_it_or_not_at_all(
    service_context: ServiceContext, account: AccountRef, statements: list[tuple[str, bool]]
) -> None:
    with service_context.session_factory() as session:
        pending = _another_account(session)
        session.add(pending)
        models.register_model(session, account, BODY, urls=service_context.url_policy, created_by=None)
        assert ("WITH", False) in statements
        session.rollback()
        assert session.scalar(select(func.count()).where(Account.name == pending.name)) == 0
    assert _versions(service_context, account) == []


async def _register_once(
    service_context: ServiceContext, writes: LoopWrites, account: AccountRef, key: str | None
) -> idempotency.StoredResponse:
    """A registration as the API makes it on PostgreSQL, with ``key`` or without."""
    made = models.registration(account, BODY, urls=service_context.url_policy, created_by=None)
    return await idempotency.run_statement_once(
        writes,
        owner="test",
        key=key,
        request_fingerprint="f",
        ttl_seconds=60,
        statement=models.REGISTER,
        statement_once=models.REGISTER_ONCE,
        prepare=lambda: made.parameters,
        answer=lambda rows: (200, {"version": made.registered(rows).version}),
    )


@pytest.mark.parametrize("keyed", [False, True])
def test_a_registration_whose_account_is_gone_leaves_nothing(
    service_context: ServiceContext, account: AccountRef, keyed: bool
) -> None:
    """Deleted while the request ran: the statement fails whole, its counter's claim too (and
    the key's claim with it)."""
    gone = AccountRef(uuid.uuid4(), "s", "rg", "gone")
    key = f"gone-{uuid.uuid4()}"

    async def register(writes: LoopWrites) -> None:
        await _register_once(service_context, writes, gone, key if keyed else None)

    with pytest.raises(IntegrityError):
        _on_the_loop(service_context, register)
    with service_context.session_factory() as session:
        assert session.scalar(select(func.count()).where(RegisteredModel.account_id == gone.id)) == 0
        assert session.scalar(select(func.count()).where(IdempotencyRecord.key == key)) == 0


def test_a_replay_makes_and_waits_for_nothing(service_context: ServiceContext, account: AccountRef) -> None:
    """A key already answered: the registration held to the claim makes nothing, so the replay
    neither bumps the name's counter nor waits on another registration of the name that holds
    it (an open transaction here)."""
    key = f"replay-{uuid.uuid4()}"

    async def register(writes: LoopWrites) -> tuple[bool, int]:
        stored = await _register_once(service_context, writes, account, key)
        return stored.replayed, stored.body["version"]

    assert _on_the_loop(service_context, register) == (False, 1)
    with service_context.session_factory() as holder:  # a registration of the name, not committed
        models.register_model(holder, account, BODY, urls=service_context.url_policy, created_by=None)

        async def replay(writes: LoopWrites) -> tuple[bool, int]:
            return await asyncio.wait_for(register(writes), 5)

        assert _on_the_loop(service_context, replay) == (True, 1)
        holder.rollback()
    with service_context.session_factory() as session:
        counter = session.scalars(select(RegisteredModel.last_version).where(RegisteredModel.account_id == account.id))
        assert list(counter) == [1]
    assert _versions(service_context, account) == [1]
