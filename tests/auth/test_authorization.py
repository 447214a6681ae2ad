"""Roles on scopes: Reader reads, Contributor writes (accounts too), Owner also grants roles; scopes do not leak."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.factories import Callers, account_url, bearer, model_body, new_account


def test_a_resource_groups_token_cannot_touch_another_group(client: TestClient, callers: Callers) -> None:
    owner = callers.headers()
    mine = new_account(client, owner, group="rg-mine")
    theirs = new_account(client, owner, group="rg-theirs")
    contributor = callers.headers("Contributor", "/subscriptions/sub-1/resourceGroups/rg-mine")

    assert client.get(mine, headers=contributor).status_code == 200
    assert client.post(f"{mine}/models", json=model_body(), headers=contributor).status_code == 200

    for response in (
        client.get(theirs, headers=contributor),
        client.get(f"{theirs}/models", headers=contributor),
        client.post(f"{theirs}/models", json=model_body(), headers=contributor),
        client.get(account_url("sub-1", "rg-theirs"), headers=contributor),
        # Even a name that does not exist answers 403, not 404: nothing leaks.
        client.get(account_url("sub-1", "rg-theirs", "no-such-account"), headers=contributor),
    ):
        assert response.status_code == 403, response.text
        assert response.json()["code"] == "AuthorizationFailed"
    assert client.get(f"{theirs}/models", headers=owner).json()["value"] == []


def test_reader_reads_but_cannot_write(client: TestClient, callers: Callers) -> None:
    owner = callers.headers()
    url = new_account(client, owner)
    model = client.post(f"{url}/models", json=model_body(), headers=owner).json()
    reader = callers.headers("Reader", url.removeprefix("/api"))

    assert client.get(f"{url}/models/{model['id']}", headers=reader).status_code == 200
    assert client.post(f"{url}/models", json=model_body(), headers=reader).status_code == 403
    assert client.delete(f"{url}/models/{model['id']}", headers=reader).status_code == 403


def test_contributors_create_and_delete_accounts_in_their_scope(client: TestClient, callers: Callers) -> None:
    contributor = callers.headers("Contributor", "/subscriptions/sub-1")
    url = account_url("sub-1", "rg-1", "made-by-contributor")
    body = {"location": "eastus2", "sku": {"name": "S1"}}
    # As in Azure: a Contributor creates and deletes resources; only role assignments need Owner.
    assert client.put(url, json=body, headers=contributor).status_code == 201
    assert client.delete(url, headers=contributor).status_code == 204
    assert client.put(account_url("sub-2", "rg-1", "x1"), json=body, headers=contributor).status_code == 403
    reader = callers.headers("Reader", "/subscriptions/sub-1")
    assert client.put(url, json=body, headers=reader).status_code == 403
    group_owner = callers.headers("Owner", "/subscriptions/sub-1/resourceGroups/rg-1")
    assert client.put(url, json=body, headers=group_owner).status_code == 201
    assert client.delete(url, headers=reader).status_code == 403
    assert client.put(account_url("sub-2", "rg-1", "x1"), json=body, headers=group_owner).status_code == 403


def test_owner_creates_principals_only_within_its_scope(client: TestClient, callers: Callers) -> None:
    group_owner = callers.headers("Owner", "/subscriptions/sub-1/resourceGroups/rg-1")
    created = client.post(
        "/api/servicePrincipals",
        json={"displayName": "ci", "role": "Contributor", "scope": "/subscriptions/sub-1/resourceGroups/rg-1"},
        headers=group_owner,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["clientSecret"] and body["tokenUrl"].endswith("/oauth2/token")
    assert body["roleAssignments"] == [{"role": "Contributor", "scope": "/subscriptions/sub-1/resourcegroups/rg-1"}]

    token = client.post(
        "/oauth2/token",
        data={"grant_type": "client_credentials", "client_id": body["clientId"], "client_secret": body["clientSecret"]},
    )
    new_token = token.json()["access_token"]
    outside = client.post(
        "/api/servicePrincipals",
        json={"displayName": "x", "role": "Reader", "scope": "/subscriptions/sub-1"},
        headers=group_owner,
    )
    assert outside.status_code == 403
    by_contributor = client.post(
        "/api/servicePrincipals",
        json={"displayName": "x", "role": "Reader", "scope": "/subscriptions/sub-1/resourceGroups/rg-1"},
        headers=bearer(new_token),
    )
    assert by_contributor.status_code == 403

    listed = client.get("/api/servicePrincipals", headers=group_owner).json()["value"]
    assert body["clientId"] in {p["clientId"] for p in listed}
    assert "clientSecret" not in str(listed) and body["clientSecret"] not in str(listed)

    assert client.delete(f"/api/servicePrincipals/{body['clientId']}", headers=group_owner).status_code == 204
    # Roles are read per request: the deleted principal's token no longer opens anything.
    assert client.get(account_url("sub-1", "rg-1"), headers=bearer(new_token)).status_code == 403
    assert client.get(f"/api/servicePrincipals/{body['clientId']}", headers=group_owner).status_code == 404


def test_bad_principal_requests(client: TestClient, callers: Callers) -> None:
    owner = callers.headers()
    bad_role = client.post(
        "/api/servicePrincipals", json={"displayName": "x", "role": "Admin", "scope": "/subscriptions/s"}, headers=owner
    )
    assert bad_role.status_code == 400 and bad_role.json()["code"] == "InvalidRole"
    bad_scope = client.post(
        "/api/servicePrincipals", json={"displayName": "x", "role": "Reader", "scope": "/foo/bar"}, headers=owner
    )
    assert bad_scope.status_code == 400 and bad_scope.json()["code"] == "InvalidScope"
