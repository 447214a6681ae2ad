"""The image event stream against a real server: every state change once, in order, per
account, resumable with Last-Event-ID, and closed when the caller's token expires or the caller
loses the right to read the account."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import delete

from app.auth.tokens import issue_token
from app.builds import CreationState
from app.builds.events import record_state_changes
from app.builds.leases import claim_build, finish_build
from app.context import ServiceContext
from app.database import session_scope
from app.orm import RoleAssignment
from app.services.principals import create_service_principal
from tests.factories import bearer
from tests.live_server import Live, live_service
from tests.sse import Listener


@pytest.fixture()
def live(service_context: ServiceContext, tmp_path) -> Iterator[Live]:
    with live_service(service_context, tmp_path, events_poll_seconds=0.05) as live:
        yield live


def _order(live: Live, *tokens: str) -> list[int]:
    """The ids behind event ids as clients see them (opaque tokens): what their order is."""
    ids = [live.context.event_ids.event_id(token) for token in tokens]
    assert None not in ids, tokens
    return ids  # type: ignore[return-value]


def _ready(live: Live, account: str, headers: dict[str, str] | None = None) -> str:
    """The id of a fresh stream's ``ready`` frame: where a client that has seen nothing starts."""
    listener = live.listen(account, headers)
    try:
        assert listener.status == 200
        ready = listener.next()
        assert ready is not None and ready.event == "ready" and ready.id is not None
        assert json.loads(ready.data) == {"lastEventId": ready.id}
        return ready.id
    finally:
        listener.close()


def _image_event(listener: Listener) -> dict:
    frame = listener.next()
    assert frame is not None, "the stream ended"
    assert frame.event == "image", frame
    event = json.loads(frame.data)
    assert event["id"] == frame.id
    return event


def _build(context: ServiceContext, image_id: str, state: CreationState) -> None:
    """What a worker does: claim the build, then finish it."""
    with session_scope(context.session_factory) as session:
        lease = claim_build(session, uuid.UUID(image_id), owner="test-worker", lease_seconds=60, max_attempts=3)
    assert lease is not None
    with session_scope(context.session_factory) as session:
        assert finish_build(
            session,
            lease,
            state=state,
            image_location="127.0.0.1:5000/x/events-image:1",
            digest="sha256:" + "a" * 64,
            smoke_test="Passed",
        )


def test_a_dashboard_sees_every_state_change_of_its_account_in_order(live: Live) -> None:
    account, other = live.account(), live.account()
    listener = live.listen(account)
    try:
        assert listener.status == 200
        ready = listener.next()
        assert ready is not None and ready.event == "ready"
        assert json.loads(ready.data) == {"lastEventId": ready.id}

        live.image(other)  # another account's build: not on this stream
        image = live.image(account)
        _build(live.context, image["Id"], CreationState.SUCCEEDED)

        states = [_image_event(listener) for _ in range(3)]
        assert [e["image"]["CreationState"] for e in states] == ["NotStarted", "Running", "Succeeded"]
        ids = _order(live, *(e["id"] for e in states))
        assert ids == sorted(ids) and ids[0] > _order(live, ready.id)[0]
        done = states[-1]
        assert done["type"] == "ImageStateChanged"
        assert done["account"] == account.split("/api", 1)[1]
        assert done["image"] | {"Error": None} == {
            "Id": image["Id"],
            "Name": "events-image",
            "Version": 1,
            "CreationState": "Succeeded",
            "ImageLocation": "127.0.0.1:5000/x/events-image:1",
            "Digest": "sha256:" + "a" * 64,
            "Error": None,
            "SmokeTest": {"result": "Passed", "reason": None},
        }

        cancelled = live.image(account, name="to-cancel")
        assert httpx.post(f"{account}/images/{cancelled['Id']}/cancel", headers=live.headers).status_code == 200
        queued, stopped = _image_event(listener), _image_event(listener)
        assert (queued["image"]["CreationState"], stopped["image"]["CreationState"]) == ("NotStarted", "Cancelled")
        assert stopped["image"]["Error"] == {"code": "BuildCancelled", "message": "cancelled before it started"}
        assert listener.frames.empty()
    finally:
        listener.close()


def test_a_client_that_reconnects_with_last_event_id_gets_what_it_missed(live: Live) -> None:
    account = live.account()
    start = _ready(live, account)  # before the account has any event
    image = live.image(account)
    _build(live.context, image["Id"], CreationState.FAILED)
    everything = live.listen(account, {**live.headers, "Last-Event-ID": start})
    try:
        history = [_image_event(everything) for _ in range(3)]
        assert [e["image"]["CreationState"] for e in history] == ["NotStarted", "Running", "Failed"]
    finally:
        everything.close()

    resumed = live.listen(account, {**live.headers, "Last-Event-ID": history[0]["id"]})
    try:
        replay = [_image_event(resumed) for _ in range(2)]
        assert [e["id"] for e in replay] == [e["id"] for e in history[1:]]
        later = live.image(account, name="later")  # and then live, on the same connection
        assert _image_event(resumed)["image"]["Id"] == later["Id"]
    finally:
        resumed.close()

    # EventSource-less clients may resume with a query parameter instead.
    by_query = Listener(f"{account}/images/events?lastEventId={history[1]['id']}", live.headers)
    try:
        assert _image_event(by_query)["id"] == history[2]["id"]
    finally:
        by_query.close()


def test_who_may_listen_and_what_a_bad_resume_point_says(live: Live) -> None:
    account, other = live.account(), live.account()
    reader = live.token("Reader", account.split("/api", 1)[1])
    assert httpx.get(f"{other}/images/events", headers=reader).status_code == 403
    assert httpx.get(f"{account}/images/events").status_code == 401
    bad = httpx.get(f"{account}/images/events", headers={**reader, "Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["message"]
    listener = live.listen(account, reader)
    try:
        assert listener.next().event == "ready"
    finally:
        listener.close()


def test_the_stream_ends_when_the_token_expires(live: Live) -> None:
    account = live.account()
    settings = live.context.settings
    with session_scope(live.context.session_factory) as session:
        principal, _ = create_service_principal(
            session, issuer=settings.issuer, display_name="short", role="Reader", scope="/", created_by=None
        )
        subject = principal.client_id
    live.principals.append(subject)
    short = issue_token(
        live.context.signing_key(), issuer=settings.issuer, audience=settings.audience, subject=subject, ttl_seconds=2
    )
    started = time.monotonic()
    listener = live.listen(account, bearer(short))
    try:
        assert listener.next().event == "ready"
        assert listener.next(timeout=10) is None  # ended by the server, not by the client
        assert time.monotonic() - started < 6
    finally:
        listener.close()


@pytest.mark.postgres_only
def test_an_event_committed_after_a_later_one_is_still_delivered(live: Live) -> None:
    account = live.account()
    first, second = live.image(account, name="slow"), live.image(account, name="fast")
    listener = live.listen(account)
    try:
        assert listener.next().event == "ready"
        slow = live.context.session_factory()
        try:
            # A transaction takes an event id and commits only after a later one did.
            record_state_changes(slow, [uuid.UUID(first["Id"])])
            with session_scope(live.context.session_factory) as fast:
                record_state_changes(fast, [uuid.UUID(second["Id"])])
            early = _image_event(listener)
            assert early["image"]["Id"] == second["Id"]
            slow.commit()
        finally:
            slow.close()
        late = _image_event(listener)
        assert late["image"]["Id"] == first["Id"]
        late_id, early_id = _order(live, late["id"], early["id"])
        assert late_id < early_id  # it took its id first
    finally:
        listener.close()


def test_a_stream_gets_no_event_committed_before_it_started(service_context: ServiceContext, tmp_path) -> None:
    # A slow poller: an event committed just before the streams subscribe is read by the hub
    # only after they did, and offered to them then; they must not pass it on, it is older
    # than their start (or than the Last-Event-ID the client already has).
    with live_service(service_context, tmp_path, events_poll_seconds=2) as live:
        account = live.account()
        live.image(account, name="before")
        fresh = live.listen(account)
        try:
            ready = fresh.next()
            assert ready is not None and ready.event == "ready"
            resumed = live.listen(account, {**live.headers, "Last-Event-ID": ready.id})
            try:
                after = live.image(account, name="after")
                for listener in (fresh, resumed):
                    event = _image_event(listener)
                    start, got = _order(live, ready.id, event["id"])
                    assert event["image"]["Id"] == after["Id"] and got > start
                    assert listener.frames.empty()
            finally:
                resumed.close()
        finally:
            fresh.close()


RECHECK_SECONDS = 1.0


@pytest.fixture()
def guarded(service_context: ServiceContext, tmp_path) -> Iterator[Live]:
    # Roles cached as in production, so the stream's own recheck is what ends it.
    with live_service(
        service_context,
        tmp_path,
        events_poll_seconds=0.05,
        auth_cache_seconds=1,
        stream_recheck_seconds=RECHECK_SECONDS,
    ) as live:
        yield live


def _revoked_stream_ends(live: Live, revoke, *, idle: bool) -> None:
    """A Reader's stream is open and delivering; ``revoke(client_id)``; then (unless ``idle``)
    an image is made: the stream ends within the recheck period and never carries that image."""
    account = live.account()
    reader = live.token("Reader", account.split("/api", 1)[1])
    client_id = live.principals[-1]
    listener, owners = live.listen(account, reader), live.listen(account)
    try:
        assert listener.next().event == "ready" and owners.next().event == "ready"
        before = live.image(account, name="before")
        assert _image_event(listener)["image"]["Id"] == before["Id"]
        assert _image_event(owners)["image"]["Id"] == before["Id"]

        revoke(client_id)
        revoked = time.monotonic()
        if not idle:
            after = live.image(account, name="after")  # committed after the revocation
        try:
            frame = listener.next(timeout=RECHECK_SECONDS + 5)
        except queue.Empty:
            pytest.fail("the revoked caller's stream stayed open")
        assert frame is None, f"a revoked caller still got {frame}"
        assert time.monotonic() - revoked < RECHECK_SECONDS + 3
        if not idle:  # the Owner's stream on the same account goes on
            assert _image_event(owners)["image"]["Id"] == after["Id"]
    finally:
        listener.close()
        owners.close()
    # Its REST calls stop within MMS_AUTH_CACHE_SECONDS (1 here), and a new stream ends at once.
    time.sleep(1.2)
    assert httpx.get(f"{account}/images/events", headers=reader).status_code == 403


def test_a_deleted_principals_stream_ends_and_gets_nothing_after_the_delete(guarded: Live) -> None:
    def delete_principal(client_id: str) -> None:
        answer = httpx.delete(f"{guarded.base}/api/servicePrincipals/{client_id}", headers=guarded.headers)
        assert answer.status_code == 204, answer.text

    _revoked_stream_ends(guarded, delete_principal, idle=False)


def test_a_stream_ends_when_its_role_assignment_is_removed_elsewhere(guarded: Live) -> None:
    def remove_role(client_id: str) -> None:
        # Straight in the database, as another API process (or `mms admin`) would: no signal in this one.
        with session_scope(guarded.context.session_factory) as session:
            assert session.execute(delete(RoleAssignment).where(RoleAssignment.subject == client_id)).rowcount == 1

    _revoked_stream_ends(guarded, remove_role, idle=True)  # no event: the periodic recheck ends it


def test_a_new_stream_of_a_revoked_caller_ends_at_once_despite_cached_roles(
    service_context: ServiceContext, tmp_path
) -> None:
    with live_service(
        service_context, tmp_path, events_poll_seconds=0.05, auth_cache_seconds=300, stream_recheck_seconds=60
    ) as live:
        account = live.account()
        reader = live.token("Reader", account.split("/api", 1)[1])
        client_id = live.principals[-1]
        assert httpx.get(account, headers=reader).status_code == 200  # its roles are now cached
        with session_scope(live.context.session_factory) as session:
            session.execute(delete(RoleAssignment).where(RoleAssignment.subject == client_id))
        for headers in (reader, {**reader, "Last-Event-ID": _ready(live, account)}):
            listener = live.listen(account, headers)
            try:
                assert listener.next(timeout=5) is None  # ended before its first frame
            finally:
                listener.close()
