"""A registration on PostgreSQL is one statement; when its route says it is the request's whole
work (``alone``: no Idempotency-Key) it is a transaction of its own, committed as it ends
(app.database.execute_alone), so a name's version counter is locked only inside the database.
The sessions here are the service's own (bound to the engine), not the tests' joined ones,
which always take the session's path."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.context import ServiceContext
from app.errors import ValidationFailed
from app.orm import Account, ModelVersion, RegisteredModel
from app.schemas.models import ModelCreate
from app.services import idempotency, models
from app.services.accounts import AccountRef

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


def test_a_registration_alone_is_one_statement_committed_as_it_ends(
    service_context: ServiceContext, account: AccountRef, statements: list[tuple[str, bool]]
) -> None:
    for expected in (1, 2):
        session = service_context.session_factory()
        try:
            statements.clear()
            registered = models.register_model(
                session, account, BODY, urls=service_context.url_policy, created_by=None, alone=True
            )
            assert registered.version == expected
            assert statements == [("WITH", True)]  # in autocommit: psycopg sends no BEGIN, no COMMIT
            assert _versions(service_context, account) == list(range(1, expected + 1))  # before the session's end
            session.commit()
        finally:
            session.close()


@pytest.mark.parametrize("alone", [False, True])
def test_a_registration_after_other_work_is_in_the_sessions_transaction(
    service_context: ServiceContext, account: AccountRef, statements: list[tuple[str, bool]], alone: bool
) -> None:
    """An Idempotency-Key's record is written first: the two commit together or not at all (its
    route says the registration is not alone; told it is, work begun before still keeps it in)."""

    def register(session: Session) -> int:
        return models.register_model(
            session, account, BODY, urls=service_context.url_policy, created_by=None, alone=alone
        ).version

    with service_context.session_factory() as session:
        stored = idempotency.run_idempotent(
            session,
            owner="test",
            key=f"k-{uuid.uuid4()}",
            request_fingerprint="f",
            ttl_seconds=60,
            action=lambda: (200, {"version": register(session)}),
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


def test_rows_pending_before_a_registration_alone_commit_with_it_or_not_at_all(
    service_context: ServiceContext, account: AccountRef, statements: list[tuple[str, bool]]
) -> None:
    with service_context.session_factory() as session:
        pending = _another_account(session)
        session.add(pending)
        models.register_model(session, account, BODY, urls=service_context.url_policy, created_by=None, alone=True)
        assert ("WITH", False) in statements
        session.rollback()
        assert session.scalar(select(func.count()).where(Account.name == pending.name)) == 0
    assert _versions(service_context, account) == []


def test_after_a_registration_alone_the_session_and_its_connection_run_transactions_again(
    service_context: ServiceContext, account: AccountRef
) -> None:
    """Its connection goes back to the pool turned back to transactions (the next request on it
    would otherwise commit each statement of a multi-statement write on its own), and the
    session's next work is a transaction of its own."""
    engine = create_engine(service_context.settings.resolved_database_url, pool_size=1, max_overflow=0)
    try:
        factory = sessionmaker(bind=engine, expire_on_commit=False)
        with factory() as session:
            models.register_model(session, account, BODY, urls=service_context.url_policy, created_by=None, alone=True)
            later = _another_account(session)
            session.add(later)
            session.flush()
            session.rollback()
            assert session.scalar(select(func.count()).where(Account.name == later.name)) == 0
        with engine.connect() as connection:  # the one connection of the pool
            assert connection.connection.driver_connection.autocommit is False
    finally:
        engine.dispose()
    assert _versions(service_context, account) == [1]


def test_a_registration_alone_whose_account_is_gone_leaves_nothing(
    service_context: ServiceContext, account: AccountRef
) -> None:
    """Deleted while the request ran: the statement fails whole, its counter's claim too."""
    gone = AccountRef(uuid.uuid4(), "s", "rg", "gone")
    with service_context.session_factory() as session, pytest.raises(IntegrityError):
        models.register_model(session, gone, BODY, urls=service_context.url_policy, created_by=None, alone=True)
    with service_context.session_factory() as session:
        assert session.scalar(select(func.count()).where(RegisteredModel.account_id == gone.id)) == 0
