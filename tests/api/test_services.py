"""Web services through the API (no worker yet: a new service stays Transitioning): shapes,
operations, 400s naming the field, 404s and 409s, PATCH and DELETE moves, keys only for
Contributors and never stored in plain form, images in use, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.builds.leases import claim_build, finish_build
from app.builds.states import CreationState
from app.context import ServiceContext
from app.deployments import reconciler
from app.deployments.states import ServiceState
from app.deployments.transitions import Transition, move
from app.event_log import EventType
from app.gateway.route_table import read_route
from app.main import create_app
from app.orm import Account, ClusterCleanup, Compute, Event, Service, ServiceLogLine, ServiceReplica
from app.orm.base import utcnow
from tests.api.test_computes import KUBECONFIG, kubernetes, swarm, with_operators_swarm
from tests.api.test_manifests import SCORE_URL
from tests.factories import Callers, client_with, model_body

DIGEST = "sha256:" + "d" * 64


def built_image(client: TestClient, db: Session, account: str, owner: dict[str, str], manifest_id: str) -> str:
    """An image of ``manifest_id`` built as a worker would: claimed, then Succeeded."""
    image_id = client.post(f"{account}/images", json={"name": "scorer", "manifestId": manifest_id}, headers=owner)
    image_id = image_id.json()["Id"]
    lease = claim_build(db, uuid.UUID(image_id), owner="test-worker", lease_seconds=60, max_attempts=3)
    assert lease is not None
    assert finish_build(
        db, lease, state=CreationState.SUCCEEDED, image_location=f"127.0.0.1:5000/x/scorer@{DIGEST}", digest=DIGEST
    )
    return image_id


@pytest.fixture()
def image_id(client: TestClient, db: Session, account: str, owner: dict[str, str], manifest_id: str) -> str:
    return built_image(client, db, account, owner, manifest_id)


def body(image_id: str, name: str = "myservice", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "imageId": image_id, **overrides}


def deploy(client: TestClient, account: str, owner: dict[str, str], image_id: str, **overrides: Any) -> dict:
    response = client.post(f"{account}/services", json=body(image_id, **overrides), headers=owner)
    assert response.status_code == 202, response.text
    return response.json()


def settle(db: Session, service_id: str, transition: Transition, to: ServiceState, **values: object) -> None:
    """What the reconciler (a later slice) will do: report the orchestrator's outcome."""
    assert move(db, transition, Service.id == uuid.UUID(service_id), to=to, **values)


def test_a_new_service_is_accepted_transitioning_with_an_operation_to_poll(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    response = client.post(f"{account}/services", json=body(image_id), headers=owner)
    assert response.status_code == 202, response.text
    service = response.json()
    assert service["state"] == "Transitioning" and service["error"] is None
    assert (service["scoringUri"], service["swaggerUri"]) == (None, None)  # nothing deployed yet
    assert (service["imageId"], service["imageDigest"]) == (image_id, DIGEST)
    assert service["imageLocation"].endswith(DIGEST)
    assert service["computeName"] == service["computeType"] == "local"
    assert service["deploymentStatus"] == {"desiredReplicas": 1, "readyReplicas": 0}
    assert (service["numReplicas"], service["autoScaler"], service["authEnabled"]) == (1, None, True)
    assert service["containerResourceRequirements"] == {"cpu": 0.1, "memoryInGB": 0.5}
    assert service["scoringTimeoutMs"] == 60000
    assert "primaryKey" not in response.text and "Key" not in "".join(service)

    location = response.headers["Operation-Location"]
    assert location.endswith(f"/operations/{service['operationId']}")
    operation = client.get(location.removeprefix("http://testserver"), headers=owner)
    assert operation.status_code == 200 and operation.headers["Retry-After"]
    assert operation.json() | {"createdTime": None} == {
        "id": service["operationId"],
        "operationType": "Service",
        "resourceLocation": f"http://testserver{account}/services/{service['id']}",
        "createdTime": None,
        "endTime": None,
        "state": "Running",
        "error": None,
    }
    assert client.get(f"{account}/services/{service['id']}", headers=owner).json() == service
    assert client.get(f"{account}/services", headers=owner).json() == {"value": [service], "nextLink": None}


def test_the_list_filters_by_name_compute_and_image(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, manifest_id: str
) -> None:
    other_image = built_image(client, db, account, owner, manifest_id)
    deploy(client, account, owner, image_id, name="alpha")
    deploy(client, account, owner, other_image, name="beta")

    def names(query: str) -> list[str]:
        return [s["name"] for s in client.get(f"{account}/services?{query}", headers=owner).json()["value"]]

    assert names("") == ["alpha", "beta"]
    assert names("name=beta") == ["beta"]
    assert names(f"imageId={other_image}") == ["beta"]
    assert names("computeName=local") == ["alpha", "beta"]
    assert names("computeName=myswarm") == []
    assert names("imageId=not-a-uuid") == []


def test_the_scoring_uri_appears_once_a_generation_takes_requests(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, app_context: ServiceContext
) -> None:
    service = deploy(client, account, owner, image_id)
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    shown = client.get(f"{account}/services/{service['id']}", headers=owner).json()
    base = f"{app_context.settings.scoring_url}/api/v1/service/{service['id']}"
    assert (shown["state"], shown["scoringUri"], shown["swaggerUri"]) == (
        "Healthy",
        f"{base}/score",
        f"{base}/swagger.json",
    )
    assert shown["deploymentStatus"] == {"desiredReplicas": 1, "readyReplicas": 1}


def test_a_failed_service_shows_why(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    settle(db, service["id"], Transition.FAIL, ServiceState.FAILED, error="init() raised ValueError: no model")
    shown = client.get(f"{account}/services/{service['id']}", headers=owner).json()
    assert shown["error"] == {"code": "DeploymentFailed", "message": "init() raised ValueError: no model"}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (
            {"deploymentConfig": {"containerResourceRequirements": {"cpu": 0}}},
            "deploymentConfig.containerResourceRequirements.cpu",
        ),
        (
            {"deploymentConfig": {"containerResourceRequirements": {"cpu": -1}}},
            "deploymentConfig.containerResourceRequirements.cpu",
        ),
        (
            {"deploymentConfig": {"containerResourceRequirements": {"cpu": 65}}},
            "deploymentConfig.containerResourceRequirements.cpu",
        ),
        (
            {"deploymentConfig": {"containerResourceRequirements": {"memoryInGB": 0.1}}},
            "deploymentConfig.containerResourceRequirements.memoryInGB",
        ),
        (
            {"deploymentConfig": {"containerResourceRequirements": {"memoryInGB": "lots"}}},
            "deploymentConfig.containerResourceRequirements.memoryInGB",
        ),
        ({"deploymentConfig": {"numReplicas": 0}}, "deploymentConfig.numReplicas"),
        (
            {"deploymentConfig": {"numReplicas": 11}},
            "deploymentConfig.numReplicas",
        ),  # past MMS_SERVICE_MAX_REPLICAS on local
        (
            {"deploymentConfig": {"autoScaler": {"autoscaleEnabled": True}}},
            "deploymentConfig.autoScaler.autoscaleEnabled",
        ),
        (
            {"deploymentConfig": {"autoScaler": {"targetUtilization": 101}}},
            "deploymentConfig.autoScaler.targetUtilization",
        ),
        ({"deploymentConfig": {"authEnabled": "maybe"}}, "deploymentConfig.authEnabled"),
        ({"deploymentConfig": {"scoringTimeoutMs": 10}}, "deploymentConfig.scoringTimeoutMs"),
        ({"name": "My_Service"}, "name"),
        ({"name": "ab"}, "name"),
        ({"name": "ends-with-"}, "name"),
        ({"imageId": None}, "imageId"),
        ({"modelIds": ["m1"], "inferenceConfig": {"entryScript": "score.py"}}, "modelIds"),
        ({"computeType": "kubernetes"}, "computeType"),
        ({"computeName": "-bad"}, "computeName"),
    ],
)
def test_bad_services_are_400s_naming_the_field(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, overrides: dict, field: str
) -> None:
    response = client.post(f"{account}/services", json=body(image_id, **overrides), headers=owner)
    assert response.status_code == 400, response.text
    assert any(d["message"].startswith(f"{field}:") for d in response.json()["details"]), response.json()
    assert client.get(f"{account}/services", headers=owner).json()["value"] == []


def _counts(client: TestClient, account: str, owner: dict[str, str]) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        len(client.get(f"{account}/{kind}", headers=owner).json()["value"])
        for kind in ("services", "images", "manifests")
    )


def test_deploying_from_models_builds_the_image_first_in_one_operation(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    config = {"entryScript": "score.py", "assets": [{"id": "score.py", "url": SCORE_URL}], "runtime": "python"}
    before = _counts(client, account, owner)
    created = client.post(
        f"{account}/services",
        json={"name": "frommodels", "modelIds": [model_id], "inferenceConfig": config},
        headers=owner,
    )
    assert created.status_code == 202, created.text
    service = created.json()
    assert service["state"] == "Transitioning" and service["imageLocation"] is None
    image = client.get(f"{account}/images/{service['imageId']}", headers=owner).json()
    assert (image["Name"], image["CreationState"]) == ("frommodels", "NotStarted")
    manifest = image["Manifest"]
    assert manifest["modelIds"] == [model_id] and manifest["name"] == "frommodels"
    operation = client.get(f"{account}/operations/{service['operationId']}", headers=owner).json()
    assert operation["state"] == "Running"
    assert _counts(client, account, owner) == (before[0] + 1, before[1] + 1, before[2] + 1)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"modelIds": ["m1"]}, "inferenceConfig"),
        ({"inferenceConfig": {"entryScript": "score.py", "assets": [], "runtime": "cobol"}}, "inferenceConfig.runtime"),
        ({"inferenceConfig": {"entryScript": "missing.py", "assets": []}}, "entryScript"),
        (
            {
                "modelIds": ["no-such-model"],
                "inferenceConfig": {"entryScript": "s", "assets": [{"id": "s", "url": SCORE_URL}]},
            },
            "modelIds",
        ),
    ],
)
def test_a_bad_deploy_from_models_is_a_4xx_and_makes_nothing(
    client: TestClient, owner: dict[str, str], account: str, overrides: dict, field: str
) -> None:
    before = _counts(client, account, owner)
    response = client.post(f"{account}/services", json={"name": "frommodels", **overrides}, headers=owner)
    assert response.status_code in (400, 404), response.text
    assert field in response.text, response.json()
    assert _counts(client, account, owner) == before


def test_a_kubernetes_target_takes_an_autoscaler_and_checks_its_range(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    assert client.put(f"{account}/computes/aks", json=kubernetes(), headers=owner).status_code == 201
    scaler = {"autoscaleEnabled": True, "minReplicas": 2, "maxReplicas": 5, "targetUtilization": 60}
    no_auth = {"authEnabled": False}  # a kubernetes target cannot check keys (test below)
    service = deploy(
        client, account, owner, image_id, computeName="aks", deploymentConfig={"autoScaler": scaler, **no_auth}
    )
    assert service["computeType"] == "kubernetes" and service["numReplicas"] is None
    assert service["autoScaler"] == scaler | {"refreshPeriodInSeconds": 1}
    assert service["deploymentStatus"]["desiredReplicas"] == 2
    for config, field in (
        ({"autoScaler": scaler | {"minReplicas": 6}, **no_auth}, "deploymentConfig.autoScaler.minReplicas"),
        ({"autoScaler": scaler, "numReplicas": 2, **no_auth}, "deploymentConfig.numReplicas"),
    ):
        response = client.post(
            f"{account}/services",
            json=body(image_id, name="other", computeName="aks", deploymentConfig=config),
            headers=owner,
        )
        assert response.status_code == 400 and response.json()["details"][0]["message"].startswith(f"{field}:")
    # 50 replicas are fine on kubernetes; local and swarm stop at MMS_SERVICE_MAX_REPLICAS.
    wide = {"numReplicas": 50, **no_auth}
    deploy(client, account, owner, image_id, name="wide", computeName="aks", deploymentConfig=wide)


def test_a_kubernetes_target_refuses_key_auth_rather_than_serve_without_it(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """Keys are checked by the scoring gateway, which a kubernetes service's traffic does not
    pass: asking for them there is a 400 (the default included), never a service without them."""
    assert client.put(f"{account}/computes/aks", json=kubernetes(), headers=owner).status_code == 201
    for config in ({}, {"authEnabled": True}):
        refused = client.post(
            f"{account}/services", json=body(image_id, computeName="aks", deploymentConfig=config), headers=owner
        )
        assert refused.status_code == 400
        message = refused.json()["details"][0]["message"]
        assert message.startswith("deploymentConfig.authEnabled: a kubernetes target cannot check scoring keys")
    service = deploy(client, account, owner, image_id, computeName="aks", deploymentConfig={"authEnabled": False})
    assert service["authEnabled"] is False
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY)
    url = f"{account}/services/{service['id']}"
    refused = client.patch(url, json={"authEnabled": True}, headers=owner)
    assert refused.status_code == 400
    assert refused.json()["details"][0]["message"].startswith("authEnabled: a kubernetes target cannot check")
    assert client.get(url, headers=owner).json()["authEnabled"] is False
    # On local, key auth is the default.
    assert deploy(client, account, owner, image_id, name="onlocal")["authEnabled"] is True


def test_switching_between_an_autoscaler_and_a_fixed_count(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    assert client.put(f"{account}/computes/aks", json=kubernetes(), headers=owner).status_code == 201
    config = {"numReplicas": 3, "authEnabled": False}
    service = deploy(client, account, owner, image_id, computeName="aks", deploymentConfig=config)
    url = f"{account}/services/{service['id']}"
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY)
    scaler = {"autoscaleEnabled": True, "minReplicas": 2, "maxReplicas": 4}
    autoscaled = client.patch(url, json={"autoScaler": scaler}, headers=owner).json()
    assert (autoscaled["numReplicas"], autoscaled["deploymentStatus"]["desiredReplicas"]) == (None, 2)
    assert autoscaled["autoScaler"]["autoscaleEnabled"] is True
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY)
    # Off without a count: as many replicas as the autoscaler last asked for.
    fixed = client.patch(url, json={"autoScaler": {"autoscaleEnabled": False}}, headers=owner).json()
    assert (fixed["numReplicas"], fixed["autoScaler"], fixed["deploymentStatus"]["desiredReplicas"]) == (2, None, 2)


def test_an_unknown_image_or_compute_is_a_404(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    for overrides, code in (
        ({"imageId": str(uuid.uuid4())}, "ImageNotFound"),
        ({"imageId": "not-an-id"}, "ImageNotFound"),
        ({"computeName": "nowhere"}, "ComputeNotFound"),
    ):
        response = client.post(f"{account}/services", json=body(image_id, **overrides), headers=owner)
        assert (response.status_code, response.json()["code"]) == (404, code), response.text


def test_an_image_that_has_not_succeeded_is_refused_naming_it(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str
) -> None:
    queued = client.post(f"{account}/images", json={"name": "queued", "manifestId": manifest_id}, headers=owner)
    response = client.post(f"{account}/services", json=body(queued.json()["Id"]), headers=owner)
    assert (response.status_code, response.json()["code"]) == (400, "ImageNotReady")
    assert response.json()["details"][0]["message"].startswith("imageId:")
    assert "NotStarted" in response.json()["message"]


def test_a_duplicate_name_is_a_409_but_another_account_may_use_it(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, callers: Callers
) -> None:
    deploy(client, account, owner, image_id)
    again = client.post(f"{account}/services", json=body(image_id), headers=owner)
    assert (again.status_code, again.json()["code"]) == (409, "ServiceExists")
    from tests.factories import new_account

    other = new_account(client, owner)
    elsewhere = client.post(f"{other}/services", json=body(image_id), headers=owner)
    assert (elsewhere.status_code, elsewhere.json()["code"]) == (404, "ImageNotFound")  # images are per account
    assert client.get(f"{other}/services", headers=owner).json()["value"] == []


def test_a_service_of_another_account_is_not_found(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    from tests.factories import new_account

    service = deploy(client, account, owner, image_id)
    other = new_account(client, owner)
    for response in (
        client.get(f"{other}/services/{service['id']}", headers=owner),
        client.delete(f"{other}/services/{service['id']}", headers=owner),
        client.post(f"{other}/services/{service['id']}/keys", headers=owner),
        client.get(f"{other}/operations/{service['operationId']}", headers=owner),
    ):
        assert response.status_code == 404, response.text


# ---- keys


def test_keys_are_shown_to_contributors_only_and_stored_sealed(
    client: TestClient,
    owner: dict[str, str],
    account: str,
    image_id: str,
    callers: Callers,
    db: Session,
    app_context: ServiceContext,
) -> None:
    service = deploy(client, account, owner, image_id)
    keys_url = f"{account}/services/{service['id']}/keys"
    keys = client.post(keys_url, headers=callers.headers("Contributor"))
    assert keys.status_code == 200
    primary, secondary = keys.json()["primaryKey"], keys.json()["secondaryKey"]
    assert len(primary) == len(secondary) == 43 and primary != secondary

    reader = callers.headers("Reader")
    assert client.get(f"{account}/services/{service['id']}", headers=reader).status_code == 200
    assert client.post(keys_url, headers=reader).status_code == 403
    regenerate = client.post(
        f"{account}/services/{service['id']}/regenerateKeys", json={"keyType": "Primary"}, headers=reader
    )
    assert regenerate.status_code == 403
    for answer in (
        client.get(f"{account}/services", headers=reader),
        client.get(f"{account}/services/{service['id']}", headers=owner),
    ):
        assert primary not in answer.text and secondary not in answer.text

    row = db.scalars(select(Service).where(Service.id == uuid.UUID(service["id"]))).one()
    stored = repr([getattr(row, column.key) for column in Service.__table__.columns])
    assert primary not in stored and secondary not in stored
    sealer = app_context.sealer
    assert (row.primary_key_digest, row.secondary_key_digest) == (
        sealer.digest(primary.encode()),
        sealer.digest(secondary.encode()),
    )


def test_regenerating_a_key_replaces_that_key_only(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    url = f"{account}/services/{service['id']}"
    before = client.post(f"{url}/keys", headers=owner).json()
    primary = client.post(f"{url}/regenerateKeys", json={"keyType": "Primary"}, headers=owner)
    assert primary.status_code == 200
    assert primary.json()["primaryKey"] != before["primaryKey"]
    assert primary.json()["secondaryKey"] == before["secondaryKey"]
    chosen = "my-own-secondary-key-0123456789"
    secondary = client.post(f"{url}/regenerateKeys", json={"keyType": "Secondary", "keyValue": chosen}, headers=owner)
    assert secondary.json() == {"primaryKey": primary.json()["primaryKey"], "secondaryKey": chosen}
    assert client.post(f"{url}/keys", headers=owner).json() == secondary.json()
    assert db.scalar(select(Service.keys_version).where(Service.id == uuid.UUID(service["id"]))) == 3
    for bad, field in (({"keyType": "Tertiary"}, "keyType"), ({"keyType": "Primary", "keyValue": "short"}, "keyValue")):
        response = client.post(f"{url}/regenerateKeys", json=bad, headers=owner)
        assert response.status_code == 400 and response.json()["details"][0]["message"].startswith(f"{field}:")


# ---- PATCH


def test_a_change_waits_until_the_service_settles(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    url = f"{account}/services/{service['id']}"
    busy = client.patch(url, json={"numReplicas": 2}, headers=owner)
    assert (busy.status_code, busy.json()["code"]) == (409, "ServiceBusy")

    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    scaled = client.patch(url, json={"numReplicas": 2}, headers=owner)
    assert scaled.status_code == 202, scaled.text
    assert scaled.json()["state"] == "Transitioning"
    assert scaled.json()["deploymentStatus"] == {"desiredReplicas": 2, "readyReplicas": 1}
    assert scaled.json()["operationId"] != service["operationId"]
    assert scaled.headers["Operation-Location"].endswith(scaled.json()["operationId"])
    assert client.get(url, headers=owner).json()["numReplicas"] == 2


def test_swapping_the_image_starts_a_new_generation_and_a_failed_service_can_be_fixed(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, manifest_id: str
) -> None:
    service = deploy(client, account, owner, image_id)
    settle(db, service["id"], Transition.FAIL, ServiceState.FAILED, error="init() raised")
    fixed_image = built_image(client, db, account, owner, manifest_id)
    swapped = client.patch(
        f"{account}/services/{service['id']}",
        json={
            "imageId": fixed_image,
            "containerResourceRequirements": {"cpu": 1, "memoryInGB": 2},
            "authEnabled": False,
        },
        headers=owner,
    )
    assert swapped.status_code == 202, swapped.text
    shown = swapped.json()
    assert (shown["imageId"], shown["state"], shown["error"], shown["authEnabled"]) == (
        fixed_image,
        "Transitioning",
        None,
        False,
    )
    assert shown["containerResourceRequirements"] == {"cpu": 1.0, "memoryInGB": 2.0}
    assert db.scalar(select(Service.generation).where(Service.id == uuid.UUID(service["id"]))) == 2


def test_resizing_rolls_out_a_new_generation_and_scaling_does_not(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    url, service_id = f"{account}/services/{service['id']}", uuid.UUID(service["id"])

    def generation_after(patch: dict) -> int:
        settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1)
        assert client.patch(url, json=patch, headers=owner).status_code == 202
        return db.scalar(select(Service.generation).where(Service.id == service_id))  # type: ignore[return-value]

    assert generation_after({"numReplicas": 2}) == 1  # more of the same replicas
    assert generation_after({"containerResourceRequirements": {"cpu": 0.1, "memoryInGB": 0.5}}) == 1  # unchanged
    assert generation_after({"containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 1}}) == 2


@pytest.mark.parametrize(
    ("patch", "status", "field"),
    [
        ({}, 400, None),
        ({"numReplicas": 0}, 400, "numReplicas"),
        ({"numReplicas": 11}, 400, "numReplicas"),
        ({"autoScaler": {"autoscaleEnabled": True}}, 400, "autoScaler.autoscaleEnabled"),
        ({"containerResourceRequirements": {"cpu": 0}}, 400, "containerResourceRequirements.cpu"),
        ({"imageId": str(uuid.uuid4())}, 404, None),
    ],
)
def test_bad_changes_are_refused_naming_the_field(
    client: TestClient,
    owner: dict[str, str],
    account: str,
    image_id: str,
    db: Session,
    patch: dict,
    status: int,
    field: str | None,
) -> None:
    service = deploy(client, account, owner, image_id)
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY)
    response = client.patch(f"{account}/services/{service['id']}", json=patch, headers=owner)
    assert response.status_code == status, response.text
    if field:
        assert response.json()["details"][0]["message"].startswith(f"{field}:")
    assert client.get(f"{account}/services/{service['id']}", headers=owner).json()["state"] == "Healthy"


# ---- DELETE, and what a service holds on to


def test_a_delete_is_accepted_and_asked_again_is_the_same_operation(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    url = f"{account}/services/{service['id']}"
    deleting = client.delete(url, headers=owner)
    assert deleting.status_code == 202 and deleting.json()["state"] == "Deleting"
    operation = client.get(f"{account}/operations/{deleting.json()['operationId']}", headers=owner).json()
    assert (operation["operationType"], operation["state"]) == ("Service", "Running")
    again = client.delete(url, headers=owner)
    assert again.status_code == 202 and again.json()["operationId"] == deleting.json()["operationId"]
    for response, code in (
        (client.patch(url, json={"numReplicas": 2}, headers=owner), "ServiceDeleting"),
        (client.post(f"{url}/regenerateKeys", json={"keyType": "Primary"}, headers=owner), "ServiceDeleting"),
    ):
        assert (response.status_code, response.json()["code"]) == (409, code)
    # The reconciler removes the row once the orchestrator holds nothing; its operation stays.
    settle(db, service["id"], Transition.DELETE, None)
    assert client.get(url, headers=owner).status_code == 404
    left = client.get(f"{account}/operations/{deleting.json()['operationId']}", headers=owner).json()
    assert left["resourceLocation"] is None


def _force_delete(client: TestClient, url: str, headers: dict[str, str]) -> dict:
    """Force delete; the answer as a delete's, its operation Succeeded already; the service as it was."""
    forced = client.delete(f"{url}?force=true", headers=headers)
    assert forced.status_code == 202, forced.text
    location = forced.headers["Operation-Location"]
    assert location.endswith(f"/operations/{forced.json()['operationId']}")
    operation = client.get(location.removeprefix("http://testserver"), headers=headers).json()
    assert (operation["state"], operation["error"], operation["resourceLocation"]) == ("Succeeded", None, None)
    assert operation["endTime"] is not None
    assert client.get(url, headers=headers).status_code == 404
    return forced.json()


def _cleanups(db: Session, service_id: str) -> list[ClusterCleanup]:
    return list(db.scalars(select(ClusterCleanup).where(ClusterCleanup.service_id == uuid.UUID(service_id))))


def _a_pass_began(db: Session, service_id: str) -> None:
    """A reconciler pass claimed the service: it may have made something on its target."""
    assert reconciler.claim(db, uuid.UUID(service_id), owner="test-worker") is not None


def test_a_service_deleting_on_a_swarm_that_never_answers_is_force_deleted_with_a_cleanup_queued(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """Its manager is gone for good: the delete stays Deleting; with force the row goes at once,
    the deleted event is told, and a row holds the swarm's manager and TLS material for the
    worker's cleanup sweep, as an account's force delete leaves."""
    assert client.put(f"{account}/computes/theirs", json=swarm(), headers=owner).status_code == 201
    service = deploy(client, account, owner, image_id, computeName="theirs", deploymentConfig={"authEnabled": False})
    _a_pass_began(db, service["id"])
    url = f"{account}/services/{service['id']}"
    deleting = client.delete(url, headers=owner).json()
    assert deleting["state"] == "Deleting"
    assert client.delete(url, headers=owner).json()["state"] == "Deleting"  # without force, as before
    assert _cleanups(db, service["id"]) == []

    forced = _force_delete(client, url, owner)
    assert (forced["id"], forced["operationId"]) == (service["id"], deleting["operationId"])  # the delete's, ended
    assert db.scalar(select(Service.id).where(Service.id == uuid.UUID(service["id"]))) is None
    [cleanup] = _cleanups(db, service["id"])
    compute = db.scalars(select(Compute).where(Compute.name == "theirs")).one()
    assert (cleanup.compute_type, cleanup.docker_host, cleanup.namespace) == (
        "swarm",
        swarm()["properties"]["dockerHost"],
        "",
    )
    assert cleanup.sealed_credentials == compute.sealed_credentials and cleanup.attempts == 0
    # The compute's path: the hosts the operator allows for it alone stay allowed to its cleanup.
    assert cleanup.compute_path == f"{account.removeprefix('/api')}/computes/theirs"
    last = db.execute(
        select(Event.state, Event.payload).where(Event.subject_id == uuid.UUID(service["id"])).order_by(Event.id.desc())
    ).first()
    assert last is not None and last.state == "Deleted" and EventType.SERVICE_DELETED in last.payload
    again = client.delete(f"{url}?force=true", headers=owner)
    assert (again.status_code, again.json()["code"]) == (404, "ServiceNotFound")
    assert len(_cleanups(db, service["id"])) == 1


def test_a_service_not_yet_deleting_is_force_deleted_at_once_and_its_change_ends(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """On a kubernetes cluster, while its create is still being applied: no Deleting first, the
    create's operation ends Failed, the Delete's Succeeded, and the cleanup row holds the namespace."""
    assert client.put(f"{account}/computes/cluster", json=kubernetes(), headers=owner).status_code == 201
    service = deploy(client, account, owner, image_id, computeName="cluster", deploymentConfig={"authEnabled": False})
    _a_pass_began(db, service["id"])
    url = f"{account}/services/{service['id']}"
    forced = _force_delete(client, url, owner)
    assert forced["state"] == "Transitioning" and forced["operationId"] != service["operationId"]
    create = client.get(f"{account}/operations/{service['operationId']}", headers=owner).json()
    assert create["state"] == "Failed"
    [cleanup] = _cleanups(db, service["id"])
    assert (cleanup.compute_type, cleanup.namespace, cleanup.docker_host) == ("kubernetes", "scoring", None)
    assert cleanup.account_id == db.scalars(select(Compute.account_id).where(Compute.name == "cluster")).one()


def test_a_service_no_reconciler_pass_ever_reached_leaves_no_cleanup_row(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """Nothing of it was ever made on its cluster: no copy of the cluster's credentials is kept."""
    assert client.put(f"{account}/computes/cluster", json=kubernetes(), headers=owner).status_code == 201
    service = deploy(client, account, owner, image_id, computeName="cluster", deploymentConfig={"authEnabled": False})
    _force_delete(client, f"{account}/services/{service['id']}", owner)
    assert _cleanups(db, service["id"]) == []


def _pending(db: Session, account_id: uuid.UUID, count: int) -> None:
    """``count`` cleanups of the account still to do (services force-deleted before)."""
    for _ in range(count):
        db.add(
            ClusterCleanup(
                service_id=uuid.uuid4(),
                account_id=account_id,
                namespace="scoring",
                sealed_credentials="sealed",
                attempts=3,
            )
        )
    db.flush()


def test_a_force_delete_past_the_accounts_pending_cleanups_is_refused_and_the_service_stays(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, app_context: ServiceContext
) -> None:
    """Each pending row holds a copy of a cluster's credentials: an account that force-deletes in
    a loop stops at MMS_CLEANUPS_PER_ACCOUNT of them. A service that needs no row still goes."""
    assert client.put(f"{account}/computes/cluster", json=kubernetes(), headers=owner).status_code == 201
    account_id = db.scalars(select(Compute.account_id).where(Compute.name == "cluster")).one()
    cap = app_context.settings.cleanups_per_account
    last, refused, unapplied = (
        deploy(
            client, account, owner, image_id, name=name, computeName="cluster", deploymentConfig={"authEnabled": False}
        )
        for name in ("last", "refused", "unapplied")
    )
    for service in (last, refused):
        _a_pass_began(db, service["id"])
    _pending(db, account_id, cap - 1)
    _force_delete(client, f"{account}/services/{last['id']}", owner)  # the cap's last row

    url = f"{account}/services/{refused['id']}"
    answer = client.delete(f"{url}?force=true", headers=owner)
    assert (answer.status_code, answer.json()["code"]) == (409, "TooManyCleanups"), answer.text
    assert "MMS_CLEANUPS_PER_ACCOUNT" in answer.json()["message"] and "wait" in answer.json()["message"]
    assert client.get(url, headers=owner).json()["state"] == "Transitioning"  # untouched
    create = client.get(f"{account}/operations/{refused['operationId']}", headers=owner).json()
    assert create["state"] == "Running"
    assert _cleanups(db, refused["id"]) == []
    held = select(func.count()).select_from(ClusterCleanup).where(ClusterCleanup.account_id == account_id)
    assert db.scalar(held) == cap

    _force_delete(client, f"{account}/services/{unapplied['id']}", owner)
    assert db.scalar(held) == cap


def test_an_accounts_delete_is_not_refused_by_its_pending_cleanups(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, app_context: ServiceContext
) -> None:
    """The account goes, and its services' rows with it (at most MMS_SERVICES_PER_ACCOUNT, once)."""
    assert client.put(f"{account}/computes/cluster", json=kubernetes(), headers=owner).status_code == 201
    account_id = db.scalars(select(Compute.account_id).where(Compute.name == "cluster")).one()
    subscription = db.scalars(select(Account.subscription_id).where(Account.id == account_id)).one()
    service = deploy(client, account, owner, image_id, computeName="cluster", deploymentConfig={"authEnabled": False})
    _a_pass_began(db, service["id"])
    _pending(db, account_id, app_context.settings.cleanups_per_account)
    assert client.delete(f"{account}?force=true", headers=owner).status_code == 204
    [cleanup] = _cleanups(db, service["id"])
    # Its tenant's, which the sweep picks fairly by: the account goes, the tenant makes others.
    assert (cleanup.account_id, cleanup.subscription_id) == (account_id, subscription.lower())


def test_a_service_on_an_attached_swarm_force_deleted_leaves_no_routes(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, callers: Callers
) -> None:
    """Healthy and routed to: the gateway's replica rows go with the service's; a Reader may not."""
    assert client.put(f"{account}/computes/theirs", json=swarm(), headers=owner).status_code == 201
    service = deploy(client, account, owner, image_id, computeName="theirs", deploymentConfig={"authEnabled": False})
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    service_id = uuid.UUID(service["id"])
    replica = "ab" * 32
    db.add(ServiceReplica(service_id=service_id, generation=1, replica_id=replica, address="10.0.0.2:5001", ready=True))
    db.flush()
    assert read_route(db, service_id) is not None
    url = f"{account}/services/{service['id']}"
    assert client.delete(f"{url}?force=true", headers=callers.headers("Reader")).status_code == 403
    assert client.get(url, headers=owner).json()["state"] == "Healthy"  # a Reader's changed nothing
    assert _force_delete(client, url, callers.headers("Contributor"))["state"] == "Healthy"
    assert len(_cleanups(db, service["id"])) == 1
    assert read_route(db, service_id) is None
    assert db.scalar(select(ServiceReplica.replica_id).where(ServiceReplica.service_id == service_id)) is None


@pytest.mark.parametrize("target", ["local", "swarm"])
def test_a_force_delete_on_a_built_in_target_is_refused_and_the_service_left_as_it_was(
    app_context: ServiceContext, owner: dict[str, str], account: str, image_id: str, db: Session, target: str
) -> None:
    """Its target always completes a plain delete, and a row forgotten at once would leave what it
    runs there (replicas, a subnet) outside the account's cap until the orphan sweep: force is
    refused; the service still serves, still counts, and a plain delete is still accepted."""
    client = client_with(app_context, services_per_account=1, swarm_docker_host="unix:///var/run/docker.sock")
    service = deploy(client, account, owner, image_id, computeName=target)
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    service_id = uuid.UUID(service["id"])
    db.add(
        ServiceReplica(service_id=service_id, generation=1, replica_id="cd" * 32, address="10.0.0.3:5001", ready=True)
    )
    db.flush()
    url = f"{account}/services/{service['id']}"

    refused = client.delete(f"{url}?force=true", headers=owner)
    assert (refused.status_code, refused.json()["code"]) == (409, "ForceDeleteNotAllowed"), refused.text
    assert f"built-in target '{target}'" in refused.json()["message"]
    assert "without force" in refused.json()["message"]
    shown = client.get(url, headers=owner).json()
    assert (shown["state"], shown["operationId"]) == ("Healthy", service["operationId"])  # no Delete recorded
    assert read_route(db, service_id) is not None
    assert _cleanups(db, service["id"]) == []
    one_more = client.post(f"{account}/services", json=body(image_id, name="one-more"), headers=owner)
    assert (one_more.status_code, one_more.json()["code"]) == (409, "TooManyServices")  # it still counts

    deleting = client.delete(url, headers=owner)
    assert (deleting.status_code, deleting.json()["state"]) == (202, "Deleting")
    again = client.delete(f"{url}?force=true", headers=owner)  # Deleting: the same answer
    assert (again.status_code, again.json()["code"]) == (409, "ForceDeleteNotAllowed")
    assert client.get(url, headers=owner).json()["state"] == "Deleting"


def test_an_image_a_service_runs_cannot_be_deleted(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    refused = client.delete(f"{account}/images/{image_id}", headers=owner)
    assert (refused.status_code, refused.json()["code"]) == (409, "ImageInUse")
    assert "myservice" in refused.json()["message"]
    assert client.delete(f"{account}/services/{service['id']}", headers=owner).status_code == 202
    assert client.delete(f"{account}/images/{image_id}", headers=owner).status_code == 409  # still Deleting
    settle(db, service["id"], Transition.DELETE, None)
    assert client.delete(f"{account}/images/{image_id}", headers=owner).status_code == 204


def test_the_image_the_old_generation_serves_during_a_rollout_cannot_be_deleted(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session, manifest_id: str
) -> None:
    service = deploy(client, account, owner, image_id)
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    new_image = built_image(client, db, account, owner, manifest_id)
    url = f"{account}/services/{service['id']}"
    assert client.patch(url, json={"imageId": new_image}, headers=owner).status_code == 202
    # The old generation serves it until the new one answers, and a roll back would go back to it.
    refused = client.delete(f"{account}/images/{image_id}", headers=owner)
    assert (refused.status_code, refused.json()["code"]) == (409, "ImageInUse")
    assert "myservice" in refused.json()["message"]

    # The new generation takes traffic (a reconciler pass that saw it answer): the old image may go.
    db.expire_all()
    lease = reconciler.claim(db, uuid.UUID(service["id"]), owner="test")
    assert lease is not None
    spec = reconciler.read_spec(db, lease)
    assert spec is not None
    ready = [reconciler.Replica("r2", 2, new_image, "10.213.0.3:5001", alive=True, ready=True)]
    now = utcnow()
    step = reconciler.decide(spec, ready, now=now, start_seconds=60, drain_seconds=10)
    assert step.flip_traffic
    assert reconciler.record(db, lease, spec, step, ready, now=now, scoring_url="http://127.0.0.1:8001")
    assert client.get(url, headers=owner).json()["state"] == "Healthy"
    assert client.delete(f"{account}/images/{image_id}", headers=owner).status_code == 204
    assert client.delete(f"{account}/images/{new_image}", headers=owner).status_code == 409


def test_a_target_that_runs_services_cannot_be_detached_or_change_type(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    assert client.put(f"{account}/computes/myswarm", json=swarm(), headers=owner).status_code == 201
    no_auth = {"authEnabled": False}  # an attached swarm cannot check keys (test below)
    service = deploy(
        client, account, owner, image_id, computeName="myswarm", computeType="swarm", deploymentConfig=no_auth
    )
    assert service["computeType"] == "swarm"
    for response in (
        client.delete(f"{account}/computes/myswarm", headers=owner),
        client.put(f"{account}/computes/myswarm", json=kubernetes(), headers=owner),
    ):
        assert (response.status_code, response.json()["code"]) == (409, "ComputeInUse")
    too_many = client.post(
        f"{account}/services",
        json=body(image_id, name="big", computeName="myswarm", deploymentConfig={"numReplicas": 11, **no_auth}),
        headers=owner,
    )
    assert too_many.status_code == 400
    assert too_many.json()["details"][0]["message"].startswith("deploymentConfig.numReplicas:")


def test_a_target_that_runs_services_keeps_its_place_but_takes_new_credentials(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """Moving a target that runs services would leave what they run at the old place (another
    manager may be another swarm, or the same one: no cleanup can tell which): a 409 naming what
    may not change. A renewed certificate or token for the same place is taken; once the
    services are gone, the target moves."""
    no_auth = {"authEnabled": False}
    assert client.put(f"{account}/computes/myswarm", json=swarm(), headers=owner).status_code == 201
    assert client.put(f"{account}/computes/aks", json=kubernetes(), headers=owner).status_code == 201
    on_swarm = deploy(
        client, account, owner, image_id, computeName="myswarm", computeType="swarm", deploymentConfig=no_auth
    )
    deploy(
        client,
        account,
        owner,
        image_id,
        name="kube",
        computeName="aks",
        computeType="kubernetes",
        deploymentConfig=no_auth,
    )
    renewed = swarm()
    renewed["properties"]["tls"]["cert"] = renewed["properties"]["tls"]["cert"].replace("fake", "renewed")
    assert client.put(f"{account}/computes/myswarm", json=renewed, headers=owner).status_code == 200
    other_cluster = KUBECONFIG.replace("k8s.example.com", "k8s-2.example.com")
    for name, moved, what in (
        ("myswarm", swarm("tcp://swarm-2.example.com:2376"), "dockerHost"),
        ("aks", kubernetes(namespace="elsewhere"), "namespace"),
        ("aks", kubernetes(other_cluster), "cluster"),
    ):
        response = client.put(f"{account}/computes/{name}", json=moved, headers=owner)
        assert (response.status_code, response.json()["code"]) == (409, "ComputeInUse"), response.text
        assert f"its {what} cannot change" in response.json()["message"]
    new_token = KUBECONFIG.replace("kube-token-never-shown", "kube-token-renewed")
    assert client.put(f"{account}/computes/aks", json=kubernetes(new_token), headers=owner).status_code == 200
    shown = client.get(f"{account}/computes/myswarm", headers=owner).json()
    assert shown["properties"]["dockerHost"] == "tcp://swarm.example.com:2376"
    # Its service gone, the swarm target moves.
    db.execute(sa_delete(Service).where(Service.id == uuid.UUID(on_swarm["id"])))
    moved = client.put(f"{account}/computes/myswarm", json=swarm("tcp://swarm-2.example.com:2376"), headers=owner)
    assert moved.status_code == 200, moved.text


def test_a_service_being_deleted_does_not_hold_its_targets_place(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    """A delete that waits on a target the worker may not reach (refused, away) completes once
    the tenant points the target elsewhere: a service being deleted does not stop that move. Its
    type still cannot change."""
    assert client.put(f"{account}/computes/myswarm", json=swarm(), headers=owner).status_code == 201
    service = deploy(
        client,
        account,
        owner,
        image_id,
        computeName="myswarm",
        computeType="swarm",
        deploymentConfig={"authEnabled": False},
    )
    assert client.delete(f"{account}/services/{service['id']}", headers=owner).status_code == 202
    assert client.get(f"{account}/services/{service['id']}", headers=owner).json()["state"] == "Deleting"
    retyped = client.put(f"{account}/computes/myswarm", json=kubernetes(), headers=owner)
    assert (retyped.status_code, retyped.json()["code"]) == (409, "ComputeInUse")
    moved = client.put(f"{account}/computes/myswarm", json=swarm("tcp://swarm-2.example.com:2376"), headers=owner)
    assert moved.status_code == 200, moved.text


def test_a_running_kubernetes_target_may_turn_to_insecure_tls_and_renew_it_where_the_operator_allows_it(
    app_context: ServiceContext, owner: dict[str, str], account: str, image_id: str
) -> None:
    """The move check reads only where a kubeconfig leads: one the operator's setting allows
    (insecure TLS) is no move, and its token renews like any other (from the review: a 500,
    then a 409 for ever)."""
    allowing = client_with(app_context, kubernetes_allow_insecure_tls=True)
    assert allowing.put(f"{account}/computes/aks", json=kubernetes(), headers=owner).status_code == 201
    no_auth = {"authEnabled": False}
    deploy(allowing, account, owner, image_id, computeName="aks", computeType="kubernetes", deploymentConfig=no_auth)
    insecure = KUBECONFIG.replace("certificate-authority-data: TFMwdExT", "insecure-skip-tls-verify: true")
    for kubeconfig in (insecure, insecure.replace("kube-token-never-shown", "kube-token-renewed")):
        response = allowing.put(f"{account}/computes/aks", json=kubernetes(kubeconfig), headers=owner)
        assert response.status_code == 200, response.text
    elsewhere = insecure.replace("k8s.example.com", "k8s-2.example.com")
    moved = allowing.put(f"{account}/computes/aks", json=kubernetes(elsewhere), headers=owner)
    assert (moved.status_code, moved.json()["code"]) == (409, "ComputeInUse")


def test_an_attached_swarm_refuses_key_auth_rather_than_serve_without_it(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """Its tasks publish their port on the tenant's manager, reachable around the gateway that
    checks keys: asking for keys there is a 400 (the default included), never a service without them."""
    assert client.put(f"{account}/computes/theirs", json=swarm(), headers=owner).status_code == 201
    for config in ({}, {"authEnabled": True}):
        refused = client.post(
            f"{account}/services", json=body(image_id, computeName="theirs", deploymentConfig=config), headers=owner
        )
        assert refused.status_code == 400
        message = refused.json()["details"][0]["message"]
        assert message.startswith("deploymentConfig.authEnabled: a swarm you attached cannot check scoring keys")
    service = deploy(client, account, owner, image_id, computeName="theirs", deploymentConfig={"authEnabled": False})
    assert service["authEnabled"] is False
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY)
    url = f"{account}/services/{service['id']}"
    refused = client.patch(url, json={"authEnabled": True}, headers=owner)
    assert refused.status_code == 400
    assert refused.json()["details"][0]["message"].startswith("authEnabled: a swarm you attached cannot check")
    assert client.get(url, headers=owner).json()["authEnabled"] is False


def test_a_swarm_the_tenant_attached_as_swarm_stays_theirs_when_the_operator_sets_one(
    client: TestClient, app_context: ServiceContext, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    """Built-in or attached is decided when the service is made and stored: an account's swarm
    attached as `swarm` while the operator had none is still the account's (its key rule, its
    engine) once the operator sets a swarm, and never becomes the operator's."""
    assert client.put(f"{account}/computes/swarm", json=swarm(), headers=owner).status_code == 201
    service = deploy(client, account, owner, image_id, computeName="swarm", deploymentConfig={"authEnabled": False})
    with_swarm = with_operators_swarm(app_context)
    url = f"{account}/services/{service['id']}"
    settle(db, service["id"], Transition.CONVERGE, ServiceState.HEALTHY)
    refused = with_swarm.patch(url, json={"authEnabled": True}, headers=owner)
    assert refused.status_code == 400, refused.text
    assert refused.json()["details"][0]["message"].startswith("authEnabled: a swarm you attached cannot check")
    lease = reconciler.claim(db, uuid.UUID(service["id"]), owner="test")
    assert lease is not None
    spec = reconciler.read_spec(db, lease)
    assert spec is not None and spec.compute_attached
    # A service made on the operator's `swarm` from then on is the operator's, keys and all.
    built_in = deploy(with_swarm, account, owner, image_id, name="onours", computeName="swarm")
    assert built_in["authEnabled"] is True
    assert db.scalar(select(Service.compute_attached).where(Service.id == uuid.UUID(built_in["id"]))) is False


def test_an_account_with_services_is_deleted_only_with_force_and_takes_them_along(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, db: Session
) -> None:
    service = deploy(client, account, owner, image_id)
    refused = client.delete(account, headers=owner)
    assert refused.status_code == 409 and "1 service(s)" in refused.json()["message"]
    assert client.delete(f"{account}?force=true", headers=owner).status_code in (200, 202, 204)
    assert db.scalar(select(Service.id).where(Service.id == uuid.UUID(service["id"]))) is None


def test_readers_see_services_but_cannot_change_them(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, callers: Callers
) -> None:
    reader = callers.headers("Reader")
    assert client.post(f"{account}/services", json=body(image_id), headers=reader).status_code == 403
    service = deploy(client, account, owner, image_id)
    url = f"{account}/services/{service['id']}"
    assert client.get(url, headers=reader).status_code == 200
    assert client.get(f"{account}/operations/{service['operationId']}", headers=reader).status_code == 200
    assert client.patch(url, json={"numReplicas": 2}, headers=reader).status_code == 403
    assert client.delete(url, headers=reader).status_code == 403
    contributor = callers.headers("Contributor")
    assert client.delete(url, headers=contributor).status_code == 202


def test_logs_are_the_newest_copied_lines_as_plain_text_never_a_page(
    client: TestClient, db: Session, owner: dict[str, str], account: str, image_id: str, callers: Callers
) -> None:
    service = deploy(client, account, owner, image_id)
    url = f"{account}/services/{service['id']}/logs"
    empty = client.get(url, headers=owner)
    assert (empty.status_code, empty.text) == (200, "")
    service_id = uuid.UUID(service["id"])
    db.add_all(
        ServiceLogLine(service_id=service_id, generation=1, replica_id="ab" * 32, logged_ns=n, text=f"<b>{n}</b>")
        for n in range(1, 4)
    )
    db.flush()
    shown = client.get(url, params={"tail": 2}, headers=callers.headers("Reader"))  # a Reader may read them
    assert shown.status_code == 200 and shown.text == f"g1 {'ab' * 6} <b>2</b>\ng1 {'ab' * 6} <b>3</b>\n"
    assert shown.headers["content-type"].startswith("text/plain")
    assert shown.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in shown.headers["content-security-policy"]
    assert client.get(url, params={"tail": 0}, headers=owner).status_code == 400  # the service maps validation to 400
    missing = client.get(f"{account}/services/{uuid.uuid4()}/logs", headers=owner)
    assert missing.status_code == 404


def test_without_the_preview_setting_the_routes_are_not_served(
    app_context: ServiceContext, db: Session, account: str, owner: dict[str, str], image_id: str
) -> None:
    context = ServiceContext.build(
        app_context.settings.model_copy(update={"web_services_preview": False}),
        engine=app_context.engine,
        session_factory=db.info["factory"],
        read_session_factory=db.info["read_factory"],
    )
    off = TestClient(create_app(context=context), base_url="http://testserver")
    for method, path in (("GET", "/services"), ("POST", "/services"), ("GET", "/computes")):
        answer = off.request(method, f"{account}{path}", json={"name": "svc", "imageId": image_id}, headers=owner)
        assert answer.status_code == 404 and answer.json()["code"] == "NotFound"
    assert "/services" not in " ".join(off.get("/openapi.json").json()["paths"])


def test_a_local_service_cannot_ask_for_more_than_the_shared_engine_gives(
    client: TestClient, owner: dict[str, str], account: str, image_id: str
) -> None:
    for resources, field in (
        ({"cpu": 64, "memoryInGB": 1}, "deploymentConfig.containerResourceRequirements.cpu: must be at most 2 "),
        (
            {"cpu": 1, "memoryInGB": 1024},
            "deploymentConfig.containerResourceRequirements.memoryInGB: must be at most 4 ",
        ),
    ):
        hog = {"numReplicas": 10, "containerResourceRequirements": resources}
        response = client.post(f"{account}/services", json=body(image_id, deploymentConfig=hog), headers=owner)
        assert response.status_code == 400, response.text
        assert field in response.json()["message"]
    fits = {"containerResourceRequirements": {"cpu": 2, "memoryInGB": 4}}
    created = client.post(f"{account}/services", json=body(image_id, deploymentConfig=fits), headers=owner)
    assert created.status_code == 202, created.text


def test_an_account_holds_at_most_the_services_the_operator_allows(
    client: TestClient, owner: dict[str, str], account: str, image_id: str, app_context: ServiceContext
) -> None:
    allowed = app_context.settings.services_per_account
    for i in range(allowed):
        assert (
            client.post(f"{account}/services", json=body(image_id, name=f"svc-{i}"), headers=owner).status_code == 202
        )
    refused = client.post(f"{account}/services", json=body(image_id, name="one-more"), headers=owner)
    assert refused.status_code == 409 and refused.json()["code"] == "TooManyServices"
