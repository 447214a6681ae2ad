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


def test_principals_are_listed_a_page_at_a_time_and_only_those_whose_every_scope_the_caller_owns(
    client: TestClient, callers: Callers
) -> None:
    group = "/subscriptions/s_1/resourceGroups/rg"
    mine = {callers.credentials("Reader", f"{group}/providers/x/accounts/a{i}")[0] for i in range(3)}
    mine.add(callers.credentials("Contributor", group)[0])
    # Not the owner's: a scope above it, another group, and one LIKE would match ('_' is any character).
    for scope in (
        "/subscriptions/s_1",
        "/subscriptions/s_1/resourceGroups/other",
        "/subscriptions/sx1/resourceGroups/rg/providers/x/accounts/b",
    ):
        callers.credentials("Reader", scope)
    owner = callers.headers("Owner", group)  # itself a principal on the group: listed too
    seen: list[str] = []
    url: str | None = "/api/servicePrincipals?count=2"
    while url:
        page = client.get(url, headers=owner)
        assert page.status_code == 200, page.text
        assert len(page.json()["value"]) <= 2
        seen += [principal["clientId"] for principal in page.json()["value"]]
        url = page.json().get("nextLink")
    assert len(seen) == len(set(seen)) == 5 and mine < set(seen)
    everyone = client.get("/api/servicePrincipals?count=1000", headers=callers.headers()).json()["value"]
    assert set(seen) < {principal["clientId"] for principal in everyone}  # the root Owner sees them all
    assert client.get("/api/servicePrincipals?$skipToken=bm9wZQ", headers=owner).status_code == 400
