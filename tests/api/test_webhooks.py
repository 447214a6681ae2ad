"""Webhook URLs often carry the receiver's token in their query: whole for Contributors and
Owners, redacted for Readers. Signing secrets are shown once, when made or rotated."""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.context import ServiceContext
from tests.factories import Callers, new_account

URL = "https://hooks.example.com/mms/events?token=receiver-secret-123&team=ml#frag-secret"


def test_a_reader_sees_webhook_urls_with_their_query_redacted(
    client: TestClient, callers: Callers, owner: dict[str, str], account: str
) -> None:
    made = client.post(f"{account}/webhooks", json={"url": URL}, headers=owner)
    assert made.status_code == 201, made.text
    hook = made.json()
    assert hook["url"] == URL
    plain = client.post(f"{account}/webhooks", json={"url": "https://hooks.example.com/plain"}, headers=owner).json()

    scope = account.removeprefix("/api")
    reader = callers.headers("Reader", scope)
    contributor = callers.headers("Contributor", scope)
    for headers, shown in (
        (reader, "https://hooks.example.com/mms/events?redacted#redacted"),
        (contributor, URL),
        (owner, URL),
    ):
        listed = client.get(f"{account}/webhooks", headers=headers)
        assert listed.status_code == 200
        assert [w["url"] for w in listed.json()["value"]] == [shown, plain["url"]]
        one = client.get(f"{account}/webhooks/{hook['id']}", headers=headers)
        assert one.status_code == 200 and one.json()["url"] == shown
    for path in ("/webhooks", f"/webhooks/{hook['id']}", f"/webhooks/{hook['id']}/deliveries"):
        answer = client.get(f"{account}{path}", headers=reader)
        assert "receiver-secret-123" not in answer.text and "frag-secret" not in answer.text
    # A reader of another scope above the account (the resource group) is still a reader.
    group_reader = callers.headers("Reader", scope.rsplit("/accounts/", 1)[0])
    assert (
        client.get(f"{account}/webhooks/{hook['id']}", headers=group_reader)
        .json()["url"]
        .endswith("?redacted#redacted")
    )


def test_a_secret_is_made_in_the_standard_webhooks_form_and_rotated_by_a_writer_only(
    client: TestClient, callers: Callers, owner: dict[str, str], account: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = client.post(f"{account}/webhooks", json={"url": "https://hooks.example.com/a"}, headers=owner).json()
    assert hook["secret"].startswith("whsec_") and len(base64.b64decode(hook["secret"][6:])) == 32
    assert hook["previousSecretExpiresTime"] is None

    rotated = client.post(f"{account}/webhooks/{hook['id']}/rotateSecret", headers=owner)
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()
    assert new["id"] == hook["id"] and new["secret"].startswith("whsec_") and new["secret"] != hook["secret"]
    overlap_ends = datetime.fromisoformat(new["previousSecretExpiresTime"])
    assert abs((overlap_ends - datetime.now(UTC)).total_seconds() - 86400) < 60  # a day, by default

    scope = account.removeprefix("/api")
    reader, contributor = callers.headers("Reader", scope), callers.headers("Contributor", scope)
    assert client.post(f"{account}/webhooks/{hook['id']}/rotateSecret", headers=reader).status_code == 403
    assert client.post(f"{account}/webhooks/{hook['id']}/rotateSecret", headers=contributor).status_code == 200
    # Another account's webhook is not found from this one, whoever asks.
    other = new_account(client, owner)
    assert client.post(f"{other}/webhooks/{hook['id']}/rotateSecret", headers=owner).status_code == 404
    assert client.post(f"{account}/webhooks/{uuid.uuid4()}/rotateSecret", headers=owner).status_code == 404

    # Neither secret is ever shown again, nor logged.
    answers = [
        client.get(f"{account}/webhooks/{hook['id']}", headers=owner),
        client.get(f"{account}/webhooks", headers=owner),
    ]
    for text in [a.text for a in answers] + [caplog.text, *(str(r.__dict__) for r in caplog.records)]:
        assert hook["secret"] not in text and new["secret"] not in text
        assert hook["secret"][6:] not in text and new["secret"][6:] not in text
    assert "secret" not in answers[0].json()


def test_a_secret_of_the_standard_form_must_hold_a_key_of_the_standard_size(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    url = "https://hooks.example.com/b"
    for bad in ("whsec_" + base64.b64encode(b"k" * 16).decode(), "whsec_not*base64*at*all*!!"):
        answer = client.post(f"{account}/webhooks", json={"url": url, "secret": bad}, headers=owner)
        assert answer.status_code == 400 and answer.json()["code"] == "InvalidWebhookSecret", answer.text
    good = "whsec_" + base64.b64encode(b"k" * 24).decode()
    made = client.post(f"{account}/webhooks", json={"url": url, "secret": good}, headers=owner)
    assert made.status_code == 201 and made.json()["secret"] == good


def test_the_delivery_log_names_events_and_pages_by_their_opaque_ids(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, app_context: ServiceContext
) -> None:
    hook = client.post(f"{account}/webhooks", json={"url": "https://hooks.example.com/x"}, headers=owner).json()
    for n in range(3):
        body = {"name": f"paged-{n}", "manifestId": manifest_id, "imageType": "Docker"}
        assert client.post(f"{account}/images", json=body, headers=owner).status_code == 202
    url, seen = f"{account}/webhooks/{hook['id']}/deliveries?count=1", []
    while url:
        page = client.get(url, headers=owner)
        assert page.status_code == 200, page.text
        seen += [delivery["eventId"] for delivery in page.json()["value"]]
        url = page.json().get("nextLink")
        if url:
            # The position it carries is the event's token, not its id (a count of every account's events).
            position = json.loads(base64.urlsafe_b64decode(parse_qs(urlsplit(url).query)["$skipToken"][0] + "=="))
            assert position == {"e": seen[-1]}
    ids = [app_context.event_ids.event_id(token) for token in seen]
    assert len(seen) == 3 and None not in ids and ids == sorted(ids, reverse=True)  # newest event first
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", token) for token in seen)
