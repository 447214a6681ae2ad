"""Web service state changes as events (issue 16, slice 9): each move a client can see is an
event, in order, recorded in the move's transaction (a reconciler pass that finds all as it was
records none); ``.../services/events`` streams them, ``.../events`` streams them with the image
events, one Last-Event-ID resumes across kinds; webhooks take them, all or the ``eventTypes``
they chose, and the real delivery worker sends them."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.builds import CreationState
from app.context import ServiceContext
from app.database import session_scope
from app.deployments.lifecycle import delete_account_services
from app.deployments.reconciler import Replica, claim, decide, finish_delete, read_spec, record
from app.deployments.states import ServiceState
from app.deployments.transitions import Transition, move
from app.orm import Event, Service, WebhookDelivery
from app.orm.base import utcnow
from tests.api.test_image_events import _build
from tests.api.test_services import built_image, deploy
from tests.factories import new_service_row
from tests.live_server import Live, free_port, live_service
from tests.sse import Frame, Listener
from tests.webhook_receiver import Receiver, receiving, verifies
from workers.webhooks import WebhookDispatcher

SECRET = "a-receiver-secret-of-some-length"


def _pass(session: Session, service_id: str, *, ready: int, scoring_url: str) -> None:
    """One reconciler pass's database half, as a deploy worker makes it: its lease, the spec,
    ``ready`` replicas of the desired generation seen answering, the verdict written."""
    lease = claim(session, uuid.UUID(service_id), owner="test-worker")
    assert lease is not None
    spec = read_spec(session, lease)
    assert spec is not None
    replicas = [
        Replica(f"r{spec.generation}-{n}", spec.generation, str(spec.image_id), f"10.213.0.{n + 2}:5001", True, True)
        for n in range(ready)
    ]
    now = utcnow()
    step = decide(spec, replicas, now=now, start_seconds=60, drain_seconds=0)
    assert record(session, lease, spec, step, replicas, now=now, scoring_url=scoring_url)


def _events(db: Session, subject_id: str) -> list[dict]:
    rows = db.scalars(select(Event.payload).where(Event.subject_id == uuid.UUID(subject_id)).order_by(Event.id))
    return [json.loads(payload) for payload in rows]


def test_every_visible_move_of_a_service_is_an_event_in_order_and_a_quiet_pass_is_none(
    client: TestClient, db: Session, owner: dict[str, str], account: str, manifest_id: str, app_context: ServiceContext
) -> None:
    scoring_url = app_context.settings.scoring_url
    service = deploy(client, account, owner, built_image(client, db, account, owner, manifest_id), name="scorer")
    sid = service["id"]
    _pass(db, sid, ready=1, scoring_url=scoring_url)  # every replica answers: Healthy
    _pass(db, sid, ready=1, scoring_url=scoring_url)  # all as it was: no event
    _pass(db, sid, ready=1, scoring_url=scoring_url)
    assert client.patch(f"{account}/services/{sid}", json={"numReplicas": 3}, headers=owner).status_code == 202
    _pass(db, sid, ready=2, scoring_url=scoring_url)  # a replica came up, still Transitioning: no event
    _pass(db, sid, ready=3, scoring_url=scoring_url)
    _pass(db, sid, ready=2, scoring_url=scoring_url)  # a replica stopped answering
    _pass(db, sid, ready=2, scoring_url=scoring_url)  # still two: Unhealthy already, no event
    assert client.delete(f"{account}/services/{sid}", headers=owner).status_code == 202
    lease = claim(db, uuid.UUID(sid), owner="test-worker")
    assert lease is not None and finish_delete(db, lease)

    events = _events(db, sid)
    states = [(e["type"], e["service"]["state"], e["service"]["deploymentStatus"]["readyReplicas"]) for e in events]
    assert states == [
        ("ServiceStateChanged", "Transitioning", 0),
        ("ServiceStateChanged", "Healthy", 1),
        ("ServiceStateChanged", "Transitioning", 1),
        ("ServiceStateChanged", "Healthy", 3),
        ("ServiceStateChanged", "Unhealthy", 2),
        ("ServiceStateChanged", "Deleting", 2),
        ("ServiceDeleted", "Deleting", 2),
    ]
    first, healthy, unhealthy, gone = events[0], events[1], events[4], events[-1]
    assert first["account"] == account.split("/api", 1)[1]
    assert first["service"] == {
        "id": sid,
        "name": "scorer",
        "state": "Transitioning",
        "error": None,
        "imageId": service["imageId"],
        "computeName": "local",
        "computeType": "local",
        "scoringUri": None,  # nothing takes requests yet
        "deploymentStatus": {"desiredReplicas": 1, "readyReplicas": 0},
    }
    # What the service's GET says, the event says.
    assert healthy["service"]["scoringUri"] == f"{scoring_url}/api/v1/service/{sid}/score"
    assert events[3]["service"]["deploymentStatus"] == {"desiredReplicas": 3, "readyReplicas": 3}
    assert unhealthy["service"]["error"] == {
        "code": "ServiceUnhealthy",
        "message": "2 of 3 replicas answer GET /: replacing the others",
    }
    assert gone["service"]["scoringUri"] is None
    rows = db.execute(select(Event.id, Event.subject_kind, Event.state).where(Event.subject_id == uuid.UUID(sid)))
    ids, kinds, stored = zip(*rows.all(), strict=True)
    assert list(ids) == sorted(ids) and set(kinds) == {"service"} and stored[-1] == "Deleted"


def test_a_move_that_changes_nothing_a_client_sees_records_no_event(db: Session) -> None:
    service = new_service_row(db)
    moved = {"error": "the orchestrator did not answer", "replicas_ready": 0}
    assert move(db, Transition.DEGRADE, Service.id == service.id, **moved)
    told = _events(db, str(service.id))
    # Unhealthy to Unhealthy, as it was: the move applies (the lease, the due time), the event does not.
    assert move(db, Transition.ROLL_BACK, Service.id == service.id, to=ServiceState.UNHEALTHY, **moved)
    assert _events(db, str(service.id)) == told
    assert [e["service"]["state"] for e in told] == ["Transitioning", "Unhealthy"]
    assert move(db, Transition.ROLL_BACK, Service.id == service.id, to=ServiceState.UNHEALTHY, error="rolled back")
    assert _events(db, str(service.id))[-1]["service"]["error"]["message"] == "rolled back"


def test_a_failed_service_and_one_gone_with_its_account_are_events(db: Session) -> None:
    service = new_service_row(db)
    assert move(db, Transition.FAIL, Service.id == service.id, error="init() raised: RuntimeError: boom")
    delete_account_services(db, service.account_id)
    events = _events(db, str(service.id))
    assert [(e["type"], e["service"]["state"]) for e in events] == [
        ("ServiceStateChanged", "Transitioning"),
        ("ServiceStateChanged", "Failed"),
        ("ServiceDeleted", "Failed"),
    ]
    assert events[1]["service"]["error"] == {"code": "DeploymentFailed", "message": "init() raised: RuntimeError: boom"}


def test_webhooks_take_every_type_or_the_event_types_they_chose(
    client: TestClient, db: Session, owner: dict[str, str], account: str, manifest_id: str, app_context: ServiceContext
) -> None:
    def register(**body: object) -> dict:
        created = client.post(f"{account}/webhooks", json={"url": "https://hooks.example.com/x", **body}, headers=owner)
        assert created.status_code == 201, created.text
        return created.json()

    every = register()
    services = register(eventTypes=["ServiceStateChanged", "ServiceDeleted", "ServiceStateChanged"])
    images = register(eventTypes=["ImageStateChanged"])
    assert every["eventTypes"] is None
    assert services["eventTypes"] == ["ServiceStateChanged", "ServiceDeleted"]  # once each
    shown = client.get(f"{account}/webhooks/{services['id']}", headers=owner).json()
    assert shown["eventTypes"] == ["ServiceStateChanged", "ServiceDeleted"]

    image_id = built_image(client, db, account, owner, manifest_id)  # NotStarted, Running, Succeeded
    service = deploy(client, account, owner, image_id)  # Transitioning
    _pass(db, service["id"], ready=1, scoring_url=app_context.settings.scoring_url)  # Healthy
    before = db.scalar(select(func.count()).select_from(WebhookDelivery))
    _pass(db, service["id"], ready=1, scoring_url=app_context.settings.scoring_url)
    assert db.scalar(select(func.count()).select_from(WebhookDelivery)) == before  # a quiet pass: nothing to send

    def kinds(hook: dict) -> list[str]:
        log = client.get(f"{account}/webhooks/{hook['id']}/deliveries", headers=owner).json()["value"]
        event_ids = [app_context.event_ids.event_id(d["eventId"]) for d in log]  # tokens, as clients see them
        kinds = db.execute(select(Event.id, Event.subject_kind).where(Event.id.in_(event_ids)))
        return sorted(kind for _, kind in kinds)

    assert kinds(every) == ["image"] * 3 + ["service"] * 2
    assert kinds(services) == ["service"] * 2
    assert kinds(images) == ["image"] * 3

    # Changed by PATCH: from the next event on; null is every type again; other changes keep them.
    patched = client.patch(f"{account}/webhooks/{images['id']}", json={"eventTypes": None}, headers=owner).json()
    assert patched["eventTypes"] is None
    paused = client.patch(f"{account}/webhooks/{services['id']}", json={"active": False}, headers=owner).json()
    assert paused["eventTypes"] == ["ServiceStateChanged", "ServiceDeleted"]
    narrowed = client.patch(f"{account}/webhooks/{every['id']}", json={"eventTypes": ["ServiceDeleted"]}, headers=owner)
    assert narrowed.json()["eventTypes"] == ["ServiceDeleted"]
    assert client.delete(f"{account}/services/{service['id']}", headers=owner).status_code == 202  # Deleting
    assert kinds(images) == ["image"] * 3 + ["service"]
    assert kinds(every) == ["image"] * 3 + ["service"] * 2


@pytest.mark.parametrize(
    ("event_types", "named"),
    [
        (["ServiceStateChanged", "ModelDeployed"], "'ModelDeployed'"),
        (["imagestatechanged"], "'imagestatechanged'"),
        ([], "at least one"),
    ],
)
def test_an_unknown_event_type_is_a_400_naming_it(
    client: TestClient, owner: dict[str, str], account: str, event_types: list[str], named: str
) -> None:
    body = {"url": "https://hooks.example.com/x", "eventTypes": event_types}
    refused = client.post(f"{account}/webhooks", json=body, headers=owner)
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "InvalidEventType" and named in refused.json()["message"]
    assert "eventTypes" in refused.json()["message"]
    assert client.get(f"{account}/webhooks", headers=owner).json()["value"] == []  # nothing registered
    hook = client.post(f"{account}/webhooks", json={"url": body["url"]}, headers=owner).json()
    patched = client.patch(f"{account}/webhooks/{hook['id']}", json={"eventTypes": event_types}, headers=owner)
    assert patched.status_code == 400 and named in patched.json()["message"]
    assert client.get(f"{account}/webhooks/{hook['id']}", headers=owner).json()["eventTypes"] is None


# -- streams and webhooks against a real server ----------------------------------------------


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    with receiving(free_port()) as state:
        yield state


@pytest.fixture()
def live(service_context: ServiceContext, receiver: Receiver, tmp_path: Path) -> Iterator[Live]:
    with live_service(
        service_context, tmp_path, events_poll_seconds=0.05, fetch_allow_hosts=[f"127.0.0.1:{receiver.port}"]
    ) as live:
        yield live


def _built(live: Live, account: str, name: str) -> str:
    image = live.image(account, name=name)
    _build(live.context, image["Id"], CreationState.SUCCEEDED)
    return image["Id"]


def _deploy(live: Live, account: str, image_id: str, name: str = "streamed") -> dict:
    created = httpx.post(f"{account}/services", json={"name": name, "imageId": image_id}, headers=live.headers)
    assert created.status_code == 202, created.text
    return created.json()


def _next(listener: Listener) -> tuple[Frame, dict]:
    frame = listener.next()
    assert frame is not None, "the stream ended"
    event = json.loads(frame.data)
    assert event["id"] == frame.id
    return frame, event


def _ready(listener: Listener) -> None:
    assert listener.status == 200
    frame = listener.next()
    assert frame is not None and frame.event == "ready"


def test_each_stream_sends_its_kinds_and_one_last_event_id_resumes_across_them(live: Live) -> None:
    account = live.account()
    everything = Listener(f"{account}/events", live.headers)
    services = Listener(f"{account}/services/events", live.headers)
    images = live.listen(account)  # .../images/events
    try:
        for listener in (everything, services, images):
            _ready(listener)
        image_id = _built(live, account, "streamed-image")  # NotStarted, Running, Succeeded
        service = _deploy(live, account, image_id)  # Transitioning
        later = live.image(account, name="later")  # NotStarted
        assert httpx.delete(f"{account}/services/{service['id']}", headers=live.headers).status_code == 202

        both = [_next(everything) for _ in range(6)]
        assert [(f.event, e["type"]) for f, e in both] == [
            ("image", "ImageStateChanged"),
            ("image", "ImageStateChanged"),
            ("image", "ImageStateChanged"),
            ("service", "ServiceStateChanged"),
            ("image", "ImageStateChanged"),
            ("service", "ServiceStateChanged"),
        ]
        ids = [live.context.event_ids.event_id(e["id"]) for _, e in both]
        assert None not in ids and ids == sorted(ids)  # id order, told by opaque ids
        # Each kind's stream: the same events, the same ids, nothing of the other kind between.
        assert [(f.event, e) for f, e in (_next(services) for _ in range(2))] == [
            (f.event, e) for f, e in both if f.event == "service"
        ]
        assert [e for _, e in (_next(images) for _ in range(4))] == [e for f, e in both if f.event == "image"]
        assert both[3][1]["service"]["id"] == service["id"] and both[4][1]["image"]["Id"] == later["Id"]
    finally:
        for listener in (everything, services, images):
            listener.close()

    # One Last-Event-ID, from any stream, resumes any other: the last image event before the
    # service's first resumes the services' stream and the mixed one at that service event...
    last_image = both[2][1]["id"]
    for path in ("services/events", "events"):
        resumed = Listener(f"{account}/{path}", {**live.headers, "Last-Event-ID": last_image})
        try:
            frame, event = _next(resumed)
            assert (frame.event, event["id"]) == ("service", both[3][1]["id"]), path
        finally:
            resumed.close()
    # ... and a service event's id resumes the images' stream at the next image event.
    resumed = Listener(f"{account}/images/events?lastEventId={both[3][1]['id']}", live.headers)
    try:
        frame, event = _next(resumed)
        assert (frame.event, event["id"]) == ("image", both[4][1]["id"])
    finally:
        resumed.close()


def test_who_may_listen_to_the_new_streams(live: Live) -> None:
    account, other = live.account(), live.account()
    reader = live.token("Reader", account.split("/api", 1)[1])
    for path in ("events", "services/events"):
        assert httpx.get(f"{other}/{path}", headers=reader).status_code == 403, path
        assert httpx.get(f"{account}/{path}").status_code == 401, path
        bad = httpx.get(f"{account}/{path}", headers={**reader, "Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["message"], path
        listener = Listener(f"{account}/{path}", reader)
        try:
            _ready(listener)  # a Reader may listen
        finally:
            listener.close()


def test_a_webhook_receives_a_service_event_from_the_delivery_worker(live: Live, receiver: Receiver) -> None:
    account = live.account()
    hook = httpx.post(
        f"{account}/webhooks",
        json={"url": receiver.url, "secret": SECRET, "eventTypes": ["ServiceStateChanged", "ServiceDeleted"]},
        headers=live.headers,
    )
    assert hook.status_code == 201, hook.text
    dispatcher = WebhookDispatcher(live.context, interval=0.05)
    dispatcher.start()
    try:
        image_id = _built(live, account, "hooked-image")  # three image events: not for this webhook
        service = _deploy(live, account, image_id, name="hooked")
        assert httpx.delete(f"{account}/services/{service['id']}", headers=live.headers).status_code == 202
        with session_scope(live.context.session_factory) as session:  # the deploy worker's last step
            lease = claim(session, uuid.UUID(service["id"]), owner="test-worker")
            assert lease is not None and finish_delete(session, lease)
        deadline = time.monotonic() + 15
        while len(receiver.received) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything more would have come by now
    finally:
        dispatcher.stop()

    received = [(json.loads(body), headers, body) for _, headers, body in receiver.received]
    bodies = sorted(received, key=lambda delivery: live.context.event_ids.event_id(delivery[0]["id"]))
    assert [(e["type"], e["service"]["state"]) for e, _, _ in bodies] == [
        ("ServiceStateChanged", "Transitioning"),
        ("ServiceStateChanged", "Deleting"),
        ("ServiceDeleted", "Deleting"),
    ]
    for event, headers, body in bodies:
        assert verifies(SECRET.encode(), headers, body)  # signed as every delivery is
        assert headers["X-MMS-Event"] == event["type"] and headers["X-MMS-Event-Id"] == event["id"]
        assert event["service"]["id"] == service["id"] and event["account"] == account.split("/api", 1)[1]
    log = httpx.get(f"{account}/webhooks/{hook.json()['id']}/deliveries", headers=live.headers).json()["value"]
    assert [d["state"] for d in log] == ["Delivered"] * 3


TOKEN = re.compile(r"[A-Za-z0-9_-]{22}")  # an event id as clients see it: 16 bytes, base64url


def _ready_id(live: Live, account: str, headers: dict[str, str]) -> str:
    listener = Listener(f"{account}/events", headers)
    try:
        assert listener.status == 200
        frame = listener.next()
        assert frame is not None and frame.event == "ready"
        assert json.loads(frame.data) == {"lastEventId": frame.id}
        return frame.id
    finally:
        listener.close()


def _etag(live: Live, account: str, image_id: str, headers: dict[str, str]) -> str:
    answer = httpx.get(f"{account}/images/{image_id}", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.headers["ETag"]


def test_a_stream_tells_nothing_of_other_accounts_activity(live: Live) -> None:
    """Event ids are one sequence for every account inside; outside, every id (a frame's, an
    event's, the ready mark, an image's ETag) is an opaque token, and a stream starts at the
    account's own newest event: a Reader cannot count another account's events."""
    account, other = live.account(), live.account()
    reader = live.token("Reader", account.split("/api", 1)[1])
    before = _ready_id(live, account, reader)
    for n in range(3):
        live.image(other, name=f"elsewhere-{n}")  # another tenant's builds: events of its own
    assert _ready_id(live, account, reader) == before

    mine = live.image(account, name="mine")  # one own event
    listener = Listener(f"{account}/events", reader)
    try:
        _ready(listener)
        etag = _etag(live, account, mine["Id"], reader)
        # Own events with many other accounts' events between them, and with none.
        first = live.image(account, name="first")
        for n in range(5):
            live.image(other, name=f"between-{n}")
        second = live.image(account, name="second")
        third = live.image(account, name="third")
        got = [_next(listener)[1] for _ in range(3)]
    finally:
        listener.close()
    assert [e["image"]["Id"] for e in got] == [first["Id"], second["Id"], third["Id"]]
    ids = [e["id"] for e in got]
    version = re.fullmatch(r'"v(.+)-[0-9a-f]{12}"', etag)
    assert version is not None, etag
    for token in [before, *ids, version[1]]:
        assert TOKEN.fullmatch(token), token  # one form, whatever lies between
        assert not token.isdigit(), token
    assert len(set(ids)) == 3 and before not in ids
    # Inside, they are as they were: 5 ids between the first two, none between the last two.
    first_id, second_id, third_id = (live.context.event_ids.event_id(token) for token in ids)
    assert second_id - first_id >= 6 and third_id - second_id == 1
    # An unchanged image keeps its ETag while other accounts' images change.
    for n in range(2):
        live.image(other, name=f"after-{n}")
    assert _etag(live, account, mine["Id"], reader) == etag
    polled = httpx.get(f"{account}/images/{mine['Id']}", headers={**reader, "If-None-Match": etag})
    assert polled.status_code == 304
    # The ready mark is the account's own newest event, whatever the others did since.
    assert _ready_id(live, account, reader) == ids[-1]
    for n in range(2):
        live.image(other, name=f"later-{n}")
    assert _ready_id(live, account, reader) == ids[-1]

    # Another account's id names a position only: resuming from it gives this account's own
    # events after it, nothing of the other's.
    elsewhere = Listener(f"{other}/events", live.headers)
    try:
        _ready(elsewhere)
        live.image(other, name="theirs")
        foreign = _next(elsewhere)[1]["id"]
    finally:
        elsewhere.close()
    fourth = live.image(account, name="fourth")
    resumed = Listener(f"{account}/events", {**reader, "Last-Event-ID": foreign})
    try:
        assert resumed.status == 200
        event = _next(resumed)[1]
        assert event["image"]["Id"] == fourth["Id"] and event["account"] == account.split("/api", 1)[1]
        time.sleep(0.3)
        assert resumed.frames.empty()  # and nothing of the other account's
    finally:
        resumed.close()
