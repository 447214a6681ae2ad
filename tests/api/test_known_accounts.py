"""An API process keeps the accounts it looked up for MMS_AUTH_CACHE_SECONDS (issue 20): a
request for an account's resources then costs no account query. Roles are still checked on
every request, the process that deletes an account forgets it at once, and another process
that still knows it answers what the database holds: nothing to read, 409 to a write, and the
truth on the next request."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.main import create_app
from app.orm import Account
from app.services.accounts import AccountPath
from tests.factories import Callers, account_url, model_body, new_account


def _process(app_context: ServiceContext, db: Session) -> TestClient:
    """Another API process on the same database: its own context, so its own caches."""
    context = ServiceContext.build(
        app_context.settings.model_copy(update={"auth_cache_seconds": 60}),
        engine=app_context.engine,
        session_factory=db.info["factory"],
        read_session_factory=db.info["read_factory"],
    )
    return TestClient(create_app(context=context), base_url="http://testserver")


@pytest.fixture()
def two_processes(app_context: ServiceContext, db: Session) -> tuple[TestClient, TestClient]:
    return _process(app_context, db), _process(app_context, db)


@contextmanager
def _account_queries(context: ServiceContext) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn, _cursor, statement: str, *_: object) -> None:
        if "FROM accounts" in statement:
            seen.append(statement)

    event.listen(context.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(context.engine, "before_cursor_execute", record)


def test_a_known_account_costs_no_query(
    two_processes: tuple[TestClient, TestClient], callers: Callers, app_context: ServiceContext
) -> None:
    api, _ = two_processes
    headers = callers.headers()
    url = new_account(api, headers)
    model = api.post(f"{url}/models", json=model_body(), headers=headers).json()
    with _account_queries(app_context) as queries:
        for _ in range(3):
            assert api.get(f"{url}/models/{model['id']}", headers=headers).status_code == 200
        assert api.post(f"{url}/models", json=model_body(), headers=headers).json()["version"] == 2
        # Any spelling of the path is the same account (ARM names are case-insensitive).
        shouted = account_url("SUB-1", "RG-1", url.rsplit("/", 1)[1].upper())
        listed = api.get(f"{shouted}/models", headers=headers).json()["value"]
        assert model["id"] in {row["id"] for row in listed}
    assert queries == []


def test_roles_are_checked_on_every_request_to_a_known_account(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    api, _ = two_processes
    url = new_account(api, callers.headers())
    assert api.get(f"{url}/models", headers=callers.headers()).status_code == 200  # now known
    reader = callers.headers("Reader")
    assert api.get(f"{url}/models", headers=reader).status_code == 200
    refused = api.post(f"{url}/models", json=model_body(), headers=reader)
    assert refused.status_code == 403 and refused.json()["code"] == "AuthorizationFailed"
    elsewhere = callers.headers("Owner", scope="/subscriptions/another-subscription")
    assert api.get(f"{url}/models", headers=elsewhere).status_code == 403


def test_the_process_that_deletes_an_account_forgets_it_at_once(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    api, _ = two_processes
    headers = callers.headers()
    url = new_account(api, headers)
    assert api.get(f"{url}/models", headers=headers).status_code == 200
    assert api.delete(url, headers=headers).status_code == 204
    gone = api.get(f"{url}/models", headers=headers)
    assert gone.status_code == 404 and gone.json()["code"] == "AccountNotFound"
    assert api.post(f"{url}/models", json=model_body(), headers=headers).json()["code"] == "AccountNotFound"


def test_another_process_that_still_knows_a_deleted_account_loses_nothing(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    stale, other = two_processes
    headers = callers.headers()
    url = new_account(stale, headers)
    model = stale.post(f"{url}/models", json=model_body(), headers=headers).json()
    assert other.delete(f"{url}?force=true", headers=headers).status_code == 204

    # Reads find what the database holds: nothing.
    assert stale.get(f"{url}/models/{model['id']}", headers=headers).status_code == 404
    # A write is refused by the foreign key: a 409 that says to retry, never a 500 or a row
    # in a deleted account; the retry sees the account is gone.
    refused = stale.post(f"{url}/models", json=model_body(), headers=headers)
    assert refused.status_code == 409 and refused.json()["code"] == "ReferenceDeleted"
    retried = stale.post(f"{url}/models", json=model_body(), headers=headers)
    assert retried.status_code == 404 and retried.json()["code"] == "AccountNotFound"


def test_an_account_made_again_under_the_same_name_is_found_after_one_refused_write(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    stale, other = two_processes
    headers = callers.headers()
    url = new_account(stale, headers, name="made-again")
    assert stale.get(f"{url}/models", headers=headers).status_code == 200
    assert other.delete(url, headers=headers).status_code == 204
    assert other.put(url, json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}}, headers=headers)

    assert stale.post(f"{url}/models", json=model_body(), headers=headers).status_code == 409
    registered = stale.post(f"{url}/models", json=model_body(), headers=headers)
    assert registered.status_code == 200 and registered.json()["version"] == 1
    assert other.get(f"{url}/models/{registered.json()['id']}", headers=headers).status_code == 200


def test_without_a_cache_time_every_request_looks_the_account_up(
    client: TestClient, callers: Callers, app_context: ServiceContext
) -> None:
    assert app_context.settings.auth_cache_seconds == 0
    headers = callers.headers()
    url = new_account(client, headers)
    with _account_queries(app_context) as queries:
        for _ in range(2):
            assert client.get(f"{url}/models", headers=headers).status_code == 200
    assert len(queries) == 2


def test_attaching_a_compute_to_a_deleted_account_another_process_still_knows_is_a_409(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    from tests.api.test_computes import swarm

    stale, other = two_processes
    headers = callers.headers()
    url = new_account(stale, headers)
    assert stale.get(f"{url}/computes", headers=headers).status_code == 200  # now known
    assert other.delete(url, headers=headers).status_code == 204

    refused = stale.put(f"{url}/computes/swarm1", json=swarm(), headers=headers)
    assert refused.status_code == 409 and refused.json()["code"] == "ReferenceDeleted", refused.text
    retried = stale.put(f"{url}/computes/swarm1", json=swarm(), headers=headers)
    assert retried.status_code == 404 and retried.json()["code"] == "AccountNotFound"


def test_a_foreign_key_refusal_is_logged_for_the_operator_without_the_statement(
    two_processes: tuple[TestClient, TestClient], callers: Callers, caplog: pytest.LogCaptureFixture
) -> None:
    """A 409 ReferenceDeleted is also what a bug that writes a wrong reference would get: the
    operator needs to see each one (which request), never the statement's values."""
    stale, other = two_processes
    headers = callers.headers()
    url = new_account(stale, headers)
    assert stale.get(f"{url}/models", headers=headers).status_code == 200
    assert other.delete(url, headers=headers).status_code == 204
    caplog.set_level(logging.INFO, logger="mms.errors")
    refused = stale.post(f"{url}/models", json=model_body(name="never-logged-name"), headers=headers)
    assert refused.status_code == 409
    records = [r for r in caplog.records if r.getMessage() == "request.reference_deleted"]
    assert len(records) == 1 and records[0].__dict__["path"] == f"{url}/models"
    assert "never-logged-name" not in " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


def test_a_lookup_that_races_the_delete_in_the_same_process_is_forgotten_at_commit(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    """A request of the deleting process that looked the account up from a snapshot taken
    before the delete committed must not leave it known after the commit."""
    api, _ = two_processes
    known = api.app.state.context.known_accounts  # type: ignore[attr-defined]
    headers = callers.headers()
    url = new_account(api, headers)
    assert api.get(f"{url}/models", headers=headers).status_code == 200
    path = AccountPath("sub-1", "rg-1", url.rsplit("/", 1)[1])
    ref = known.get(path)
    assert ref is not None

    def deleted(session: Session, _context: object) -> None:
        if any(isinstance(row, Account) for row in session.deleted):
            session.info["review.account_deleted"] = True

    def racing_lookup(session: Session) -> None:
        if session.info.pop("review.account_deleted", False):
            known.put(path, ref)  # as a concurrent GET that read before this commit would

    event.listen(Session, "after_flush", deleted)
    event.listen(Session, "before_commit", racing_lookup)
    try:
        assert api.delete(url, headers=headers).status_code == 204
    finally:
        event.remove(Session, "after_flush", deleted)
        event.remove(Session, "before_commit", racing_lookup)
    gone = api.get(f"{url}/models", headers=headers)
    assert gone.status_code == 404 and gone.json()["code"] == "AccountNotFound"


def test_an_event_stream_looks_its_account_up_as_it_opens(
    two_processes: tuple[TestClient, TestClient], callers: Callers
) -> None:
    """A stream stays bound to an account for long: one opened through a stale entry would
    follow the deleted account's id (and never the account made again under its name)."""
    stale, other = two_processes
    headers = callers.headers()
    url = new_account(stale, headers)
    assert stale.get(f"{url}/models", headers=headers).status_code == 200  # now known
    assert other.delete(url, headers=headers).status_code == 204
    with stale.stream("GET", f"{url}/images/events", headers=headers) as opened:
        assert opened.status_code == 404
        opened.read()
    assert opened.json()["code"] == "AccountNotFound"
