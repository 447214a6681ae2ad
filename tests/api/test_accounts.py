"""Accounts: create, update, get, list, delete, as an ARM client sees them."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.orm import Account, RoleAssignment
from tests.factories import Callers, account_url, model_body, new_account

BODY = {"location": "eastus2", "sku": {"name": "S1", "capacity": 1}}


def test_put_creates_then_updates_the_sku(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    url = account_url("sub-1", "rg-1", "myaccount")
    created = client.put(url, json=BODY, headers=headers)
    assert created.status_code == 201
    assert created.json()["id"] == "/subscriptions/sub-1/resourceGroups/rg-1/accounts/myaccount"
    assert created.json()["sku"] == {"name": "S1", "capacity": 1}

    updated = client.put(url, json={**BODY, "sku": {"name": "S2", "capacity": 3}}, headers=headers)
    assert updated.status_code == 200
    assert updated.json()["sku"] == {"name": "S2", "capacity": 3}
    assert updated.json()["properties"]["accountId"] == created.json()["properties"]["accountId"]
    # ARM names are case-insensitive.
    fetched = client.get(account_url("SUB-1", "RG-1", "MyAccount"), headers=headers)
    assert fetched.status_code == 200
    assert fetched.json()["sku"]["name"] == "S2"


def test_location_cannot_change(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    url = new_account(client, headers)
    response = client.put(url, json={**BODY, "location": "westus"}, headers=headers)
    assert response.status_code == 409
    assert response.json()["code"] == "LocationCannotChange"


def test_bad_account_bodies_name_the_field(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    url = account_url("sub-1", "rg-1", "acct-bad")
    missing = client.put(url, json={"location": "eastus2"}, headers=headers)
    assert missing.status_code == 400
    assert missing.json()["details"][0]["message"].startswith("sku")
    capacity = client.put(url, json={**BODY, "sku": {"name": "S1", "capacity": 0}}, headers=headers)
    assert capacity.status_code == 400
    assert "sku.capacity" in capacity.json()["message"]
    bad_name = client.put(account_url("sub-1", "rg-1", "bad name!"), json=BODY, headers=headers)
    assert bad_name.status_code == 400
    assert "accountName: must be 2-64 letters" in bad_name.json()["message"]
    assert client.get(url, headers=headers).status_code == 404


def test_list_pages_through_a_resource_group(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    names = [f"paged-{i}" for i in range(5)]
    for name in names:
        new_account(client, headers, group="rg-list", name=name)
    new_account(client, headers, group="rg-other", name="elsewhere")

    seen, url = [], account_url("sub-1", "rg-list") + "?count=2"
    while url:
        page = client.get(url, headers=headers)
        assert page.status_code == 200, page.text
        seen += [a["name"] for a in page.json()["value"]]
        url = page.json()["nextLink"]
    assert seen == names


def test_delete_refuses_an_account_with_models_unless_forced(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    url = new_account(client, headers)
    assert client.post(f"{url}/models", json=model_body(), headers=headers).status_code == 200

    refused = client.delete(url, headers=headers)
    assert refused.status_code == 409
    assert refused.json()["code"] == "AccountNotEmpty"
    assert client.get(url, headers=headers).status_code == 200

    assert client.delete(f"{url}?force=true", headers=headers).status_code == 204
    assert client.get(url, headers=headers).status_code == 404
    assert client.delete(url, headers=headers).status_code == 404


def test_empty_account_deletes(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    url = new_account(client, headers)
    assert client.delete(url, headers=headers).status_code == 204


def test_api_version(client: TestClient, callers: Callers) -> None:
    headers = callers.headers()
    url = new_account(client, headers)
    assert client.get(url, headers=headers).status_code == 200
    assert client.get(f"{url}?api-version=2017-09-01-preview", headers=headers).status_code == 200
    unknown = client.get(f"{url}?api-version=2099-01-01", headers=headers)
    assert unknown.status_code == 400
    assert unknown.json()["code"] == "UnsupportedApiVersion"
    assert "2017-09-01-preview" in unknown.json()["message"]


def test_a_principal_sees_every_account_it_may_read_across_its_scopes_and_nothing_else(
    client: TestClient, callers: Callers, db: Session
) -> None:
    owner = callers.headers()
    for subscription, group, name in [
        ("disc-a", "rg-1", "one"),
        ("disc-a", "rg-2", "two"),  # both under the subscription grant
        ("disc-b", "RG-X", "three"),  # under the resource group grant (ARM names ignore case)
        ("disc-b", "rg-y", "four"),  # not granted
        ("disc-c", "rg-1", "five"),  # the single account grant
        ("disc-c", "rg-1", "six"),  # not granted
    ]:
        new_account(client, owner, subscription, group, name)
    client_id, secret = callers.credentials("Reader", "/subscriptions/disc-a")
    for role, scope in [
        ("Contributor", "/subscriptions/disc-b/resourcegroups/rg-x"),
        ("Reader", "/subscriptions/disc-c/resourcegroups/rg-1/accounts/five"),
    ]:
        db.add(RoleAssignment(issuer=callers.issuer, subject=client_id, role=role, scope=scope))
    db.flush()
    token = client.post(
        "/oauth2/token", data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    listed = client.get("/api/accounts", headers=headers)
    assert listed.status_code == 200, listed.text
    assert [a["id"] for a in listed.json()["value"]] == [
        "/subscriptions/disc-a/resourceGroups/rg-1/accounts/one",
        "/subscriptions/disc-a/resourceGroups/rg-2/accounts/two",
        "/subscriptions/disc-b/resourceGroups/RG-X/accounts/three",
        "/subscriptions/disc-c/resourceGroups/rg-1/accounts/five",
    ]
    # Paged one at a time, the same four in the same order.
    seen, url = [], "/api/accounts?count=1"
    while url:
        page = client.get(url, headers=headers).json()
        seen += [a["name"] for a in page["value"]]
        url = page.get("nextLink")
    assert seen == ["one", "two", "three", "five"]
    # No role, no account; no token, a 401.
    nobody = callers.headers("Reader", "/subscriptions/disc-none")
    assert client.get("/api/accounts", headers=nobody).json()["value"] == []
    assert client.get("/api/accounts").status_code == 401
    assert client.get("/api/accounts?$skipToken=forged", headers=headers).status_code == 400


def test_an_account_is_reached_only_by_callers_of_its_own_scope_whatever_its_letters(
    client: TestClient, callers: Callers, db: Session
) -> None:
    """Roles compare paths lower-cased by Python; the database lower-cases by its own rules
    (SQLite: ASCII only; PostgreSQL: 'İ' is 'i', not Python's 'i' + U+0307). A path the two
    spell differently would make an account its creator cannot reach, and on PostgreSQL one
    a caller of another resource group ('izmir') reaches: refused at creation, naming it."""
    body = {"location": "eastus2", "sku": {"name": "S1", "capacity": 1}}
    for group in ("İzmir", "Éte"):
        headers = callers.headers("Owner", scope=f"/subscriptions/sub-1/resourceGroups/{group}")
        url = account_url("sub-1", group, "acct")
        made = client.put(url, json=body, headers=headers)
        if made.status_code == 201:  # the database lower-cases it as Python does: reachable
            assert client.get(url, headers=headers).status_code == 200
            assert client.get(f"{url}/models", headers=headers).status_code == 200
            continue
        assert made.status_code == 400 and "resourceGroup" in made.json()["message"], made.text
        assert client.get(url, headers=headers).json()["code"] == "AccountNotFound"
    assert db.scalar(select(func.count()).select_from(Account).where(Account.name == "acct")) <= 1

    # Made before this check: reachable from no other resource group's path.
    db.add(
        Account(
            subscription_id="sub-1",
            resource_group="İzmir",
            name="old",
            location="eastus2",
            sku_name="S1",
            sku_capacity=1,
        )
    )
    db.flush()
    other = callers.headers("Owner", scope="/subscriptions/sub-1/resourceGroups/izmir")
    assert client.get(account_url("sub-1", "izmir", "old"), headers=other).status_code == 404
    assert client.get(f"{account_url('sub-1', 'izmir', 'old')}/models", headers=other).status_code == 404
