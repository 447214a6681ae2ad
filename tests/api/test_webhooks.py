"""Webhook URLs often carry the receiver's token in their query: whole for Contributors and
Owners, redacted for Readers."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.factories import Callers

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
