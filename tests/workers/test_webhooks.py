"""Webhooks against a real receiver: every state change POSTed, signed (Standard Webhooks,
and the deprecated X-MMS-Signature), retried with backoff until it lands or the attempts run
out, under the fetcher's address rules, with a log; secrets rotated with an overlap."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from app.context import ServiceContext
from app.database import session_scope
from app.orm import Webhook
from app.orm.base import utcnow
from tests.live_server import Live, free_port, live_service
from tests.webhook_receiver import Receiver, receiving, verifies
from workers.webhooks import WebhookDispatcher, backoff_seconds, signature, standard_signature

SECRET = "a-receiver-secret-of-some-length"


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    with receiving(free_port()) as state:
        yield state


@pytest.fixture()
def live(service_context: ServiceContext, receiver: Receiver, tmp_path: Path) -> Iterator[Live]:
    # The receiver is on loopback: allowed by name, as an internal receiver would be.
    with live_service(
        service_context,
        tmp_path,
        fetch_allow_hosts=[f"127.0.0.1:{receiver.port}"],
        webhook_retry_base_seconds=0.3,
        webhook_max_attempts=3,
    ) as live:
        dispatcher = WebhookDispatcher(live.context, interval=0.05)
        dispatcher.start()
        yield live
        dispatcher.stop()


def _register(live: Live, account: str, url: str, **body: object) -> dict:
    created = httpx.post(f"{account}/webhooks", json={"url": url, "secret": SECRET, **body}, headers=live.headers)
    assert created.status_code == 201, created.text
    return created.json()


def _deliveries(live: Live, account: str, hook: dict, until, seconds: float = 15) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        log = httpx.get(f"{account}/webhooks/{hook['id']}/deliveries", headers=live.headers).json()["value"]
        if until(log) or time.monotonic() > deadline:
            return log
        time.sleep(0.1)


def test_a_state_change_is_posted_signed_and_retried_with_backoff_until_it_lands(
    live: Live, receiver: Receiver
) -> None:
    account = live.account()
    hook = _register(live, account, receiver.url, description="ci dashboard")
    assert hook["secret"] == SECRET
    assert "secret" not in httpx.get(f"{account}/webhooks/{hook['id']}", headers=live.headers).json()
    receiver.statuses = [500, 503]  # the receiver is down twice, then up

    stream = live.listen(account)
    try:
        assert stream.next().event == "ready"
        image = live.image(account)
        streamed = stream.next()
    finally:
        stream.close()
    log = _deliveries(live, account, hook, lambda log: log and log[0]["state"] != "Pending")
    assert len(log) == 1
    assert log[0] | {
        "id": None,
        "createdTime": None,
        "lastAttemptTime": None,
        "deliveredTime": None,
        "durationMs": None,
        "eventId": None,
    } == {
        "id": None,
        "eventId": None,
        "state": "Delivered",
        "attempts": 3,
        "responseStatus": 200,
        "error": None,
        "durationMs": None,
        "createdTime": None,
        "lastAttemptTime": None,
        "nextAttemptTime": None,
        "deliveredTime": None,
    }

    assert len(receiver.received) == 3
    (t1, _, _), (t2, _, _), (t3, headers, body) = receiver.received
    assert t2 - t1 >= 0.25 and t3 - t2 >= 0.5  # base 0.3 s, doubled (±10 %)
    assert {h["X-MMS-Delivery"] for _, h, _ in receiver.received} == {log[0]["id"]}
    expected = hmac.new(SECRET.encode(), headers["X-MMS-Timestamp"].encode() + b"." + body, hashlib.sha256)
    assert headers["X-MMS-Signature"] == "sha256=" + expected.hexdigest()
    assert abs(int(headers["X-MMS-Timestamp"]) - time.time()) < 30
    event = json.loads(body)
    # The event's id, as the stream gave it: an opaque token, the same everywhere.
    assert event["id"] == headers["X-MMS-Event-Id"] == log[0]["eventId"] == streamed.id
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", event["id"]) and json.loads(streamed.data) == event
    assert headers["X-MMS-Event"] == event["type"] == "ImageStateChanged"
    assert event["image"]["Id"] == image["Id"] and event["image"]["CreationState"] == "NotStarted"
    assert SECRET.encode() not in body and SECRET not in str(headers)

    # The Standard Webhooks headers: a plain secret's key is its UTF-8 bytes.
    assert headers["webhook-id"] == log[0]["id"] and headers["webhook-timestamp"] == headers["X-MMS-Timestamp"]
    assert verifies(SECRET.encode(), headers, body)
    assert verifies("whsec_" + base64.b64encode(SECRET.encode()).decode(), headers, body)
    by_hand = hmac.new(SECRET.encode(), f"{log[0]['id']}.{headers['webhook-timestamp']}.".encode() + body, "sha256")
    assert headers["webhook-signature"] == "v1," + base64.b64encode(by_hand.digest()).decode()
    assert not verifies(SECRET.encode(), headers, body.replace(b"NotStarted", b"Succeeded"))
    assert not verifies(b"another-secret-of-some-length", headers, body)


def test_a_rotated_secret_signs_beside_the_old_one_until_the_overlap_ends(
    live: Live, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    account = live.account()
    hook = _register(live, account, receiver.url, secret=None)
    old = hook["secret"]
    new = httpx.post(f"{account}/webhooks/{hook['id']}/rotateSecret", headers=live.headers).json()["secret"]
    receiver.secrets = [old, new]  # a receiver that answers 401 unless a secret verifies

    live.image(account, name="during")
    during = _deliveries(live, account, hook, lambda log: log and log[0]["state"] != "Pending")
    assert [d["state"] for d in during] == ["Delivered"], during
    assert receiver.verified_with == [[old, new]]
    assert len(receiver.received[0][1]["webhook-signature"].split(" ")) == 2

    # A day later (the overlap's end moved into the past): only the new secret signs.
    with session_scope(live.context.session_factory) as session:
        past = utcnow() - timedelta(seconds=1)
        session.execute(
            update(Webhook).where(Webhook.id == uuid.UUID(hook["id"])).values(previous_secret_expires_at=past)
        )
    live.image(account, name="after")
    after = _deliveries(live, account, hook, lambda log: len(log) == 2 and log[0]["state"] != "Pending")
    assert [d["state"] for d in after] == ["Delivered", "Delivered"], after
    assert receiver.verified_with == [[old, new], [new]]
    assert len(receiver.received[1][1]["webhook-signature"].split(" ")) == 1

    for text in [caplog.text, *(str(r.__dict__) for r in caplog.records)]:
        assert old not in text and new not in text and old[6:] not in text and new[6:] not in text
    for path in ("", f"/{hook['id']}", f"/{hook['id']}/deliveries"):
        assert old not in httpx.get(f"{account}/webhooks{path}", headers=live.headers).text
        assert new not in httpx.get(f"{account}/webhooks{path}", headers=live.headers).text


def test_a_replayed_delivery_is_refused_for_its_old_timestamp() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    body, message = b'{"id":"1"}', "a-delivery-id"
    now = int(time.time())
    fresh = {"webhook-id": message, "webhook-timestamp": str(now)}
    fresh["webhook-signature"] = standard_signature([secret], message, now, body)
    assert verifies(secret, fresh, body)
    stale = {"webhook-id": message, "webhook-timestamp": str(now - 600)}
    stale["webhook-signature"] = standard_signature([secret], message, now - 600, body)  # signed, but old
    assert not verifies(secret, stale, body)
    assert not verifies(secret, fresh | {"webhook-id": "another-delivery"}, body)


def test_a_receiver_that_never_answers_well_is_given_up_on(live: Live, receiver: Receiver) -> None:
    account = live.account()
    hook = _register(live, account, receiver.url)
    receiver.statuses = [500] * 10
    live.image(account)
    log = _deliveries(live, account, hook, lambda log: log and log[0]["state"] == "Failed")
    assert log[0]["state"] == "Failed" and log[0]["attempts"] == 3
    assert log[0]["responseStatus"] == 500 and "HTTP 500" in log[0]["error"]
    assert len(receiver.received) == 3


def test_a_private_address_is_refused_once_and_never_contacted(live: Live, receiver: Receiver) -> None:
    account = live.account()
    other = Receiver(free_port())  # loopback, but not on the allow list
    hook = _register(live, account, other.url.replace("127.0.0.1", "localhost"))
    live.image(account)
    log = _deliveries(live, account, hook, lambda log: log and log[0]["state"] != "Pending")
    assert log[0]["state"] == "Failed" and log[0]["attempts"] == 1
    # The host the tenant gave, and what kind of address it is at: never the address itself.
    assert "host localhost is at a loopback address" in log[0]["error"]
    assert "127.0.0.1" not in log[0]["error"] and "::1" not in log[0]["error"]
    assert receiver.received == []


def test_a_paused_webhook_is_sent_nothing_new_and_a_deleted_one_keeps_no_log(live: Live, receiver: Receiver) -> None:
    account = live.account()
    hook = _register(live, account, receiver.url)
    paused = httpx.patch(f"{account}/webhooks/{hook['id']}", json={"active": False}, headers=live.headers)
    assert paused.status_code == 200 and paused.json()["active"] is False
    live.image(account)
    time.sleep(0.5)
    assert httpx.get(f"{account}/webhooks/{hook['id']}/deliveries", headers=live.headers).json()["value"] == []
    assert receiver.received == []
    assert httpx.delete(f"{account}/webhooks/{hook['id']}", headers=live.headers).status_code == 204
    assert httpx.get(f"{account}/webhooks/{hook['id']}", headers=live.headers).status_code == 404


def test_what_a_webhook_registration_refuses(live: Live) -> None:
    account = live.account()
    for url, word in (("ftp://example.com/x", "http"), ("https://user:pw@example.com/x", "credentials")):
        bad = httpx.post(f"{account}/webhooks", json={"url": url}, headers=live.headers)
        assert bad.status_code == 400 and word in bad.json()["message"], bad.text
    short = httpx.post(
        f"{account}/webhooks", json={"url": "https://example.com/x", "secret": "short"}, headers=live.headers
    )
    assert short.status_code == 400 and "secret" in short.json()["message"]
    made = httpx.post(f"{account}/webhooks", json={"url": "https://example.com/x"}, headers=live.headers).json()
    assert len(made["secret"]) >= 32 and made["secret"].startswith("whsec_")  # made for the caller, shown once
    reader = live.token("Reader", account.split("/api", 1)[1])
    assert httpx.post(f"{account}/webhooks", json={"url": "https://example.com/y"}, headers=reader).status_code == 403
    assert [w["id"] for w in httpx.get(f"{account}/webhooks", headers=reader).json()["value"]] == [made["id"]]
    bad_state = httpx.get(f"{account}/webhooks/{made['id']}/deliveries?state=Lost", headers=reader)
    assert bad_state.status_code == 400


def test_signature_and_backoff_are_what_receivers_are_told() -> None:
    assert (
        signature(b"k", "1700000000", b"{}") == "sha256=" + hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    )
    assert [round(backoff_seconds(n, 10) / (10 * 2 ** (n - 1)), 1) in (0.9, 1.0, 1.1) for n in (1, 2, 3)] == [True] * 3
    assert backoff_seconds(20, 10) <= 3600 * 1.1
