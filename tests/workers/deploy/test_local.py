"""Web services on the ``local`` target, end to end: the API records a service, a real deploy
worker (the reconciler) starts contained replicas on the test engine, the scoring gateway
routes to them with a key; failures are states, a killed replica is replaced, a delete leaves
nothing in the engine."""

from __future__ import annotations

import time
import uuid

import docker
import httpx
import pytest

from tests.infra import Infra
from tests.workers.stack import SCORE_PY, Account, Stack, register_model, sklearn_requirements

SERVICE_LABEL = "org.mms.service"
DEPLOY_TIMEOUT = 180


@pytest.fixture(scope="module")
def web(stack: Stack) -> Stack:
    stack.start_web_services()
    return stack


@pytest.fixture(scope="module")
def engine(infra: Infra):  # type: ignore[no-untyped-def]
    api = docker.APIClient(base_url=infra.docker_host, version="auto", timeout=30)
    yield api
    api.close()


@pytest.fixture(scope="module")
def account(web: Stack) -> Account:
    return Account(web)


@pytest.fixture(scope="module")
def housing_image(account: Account, model) -> tuple[dict, object, list]:  # type: ignore[no-untyped-def]
    trained, rows, archive = model
    model_id = register_model(account, archive)
    manifest = account.manifest(model_id, SCORE_PY, sklearn_requirements(), name="housing-service")
    image = account.wait(account.build(manifest, "housing-svc")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    return image, trained, rows


def _deploy(account: Account, image_id: str, name: str, *, replicas: int = 1) -> dict:
    created = account.call(
        "POST",
        f"{account.url}/services",
        json={
            "name": name,
            "imageId": image_id,
            "deploymentConfig": {
                "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 0.5},
                "numReplicas": replicas,
            },
        },
    )
    assert created.status_code == 202
    return created.json()


def _wait(account: Account, service_id: str, *states: str, seconds: float = DEPLOY_TIMEOUT) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        service = account.call("GET", f"{account.url}/services/{service_id}").json()
        if service["state"] in states:
            return service
        assert time.monotonic() < deadline, f"service never became {states}: {service}"
        time.sleep(0.5)


def _delete(account: Account, service_id: str) -> None:
    """Delete the service and wait until the reconciler removed it (the row goes last)."""
    account.call("DELETE", f"{account.url}/services/{service_id}")
    deadline = time.monotonic() + 60
    while account.status("GET", f"{account.url}/services/{service_id}") != 404:
        assert time.monotonic() < deadline, "the service was never deleted"
        time.sleep(0.5)


def _keys(account: Account, service_id: str) -> tuple[str, str]:
    keys = account.call("POST", f"{account.url}/services/{service_id}/keys").json()
    return keys["primaryKey"], keys["secondaryKey"]


def _held(engine, service_id: str) -> tuple[list, list]:  # type: ignore[no-untyped-def]
    label = {"label": f"{SERVICE_LABEL}={service_id}"}
    return engine.containers(all=True, filters=label), engine.networks(filters=label)


def _score(service: dict, key: str | None, rows: list) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(service["scoringUri"], json={"data": rows}, headers=headers, timeout=30)


def _wait_scores(service: dict, key: str, rows: list, seconds: float = 30) -> httpx.Response:
    """The gateway reads a route at most its cache period late: the first 200 within it."""
    deadline = time.monotonic() + seconds
    while (answer := _score(service, key, rows)).status_code != 200:
        assert time.monotonic() < deadline, f"{answer.status_code} {answer.text}"
        time.sleep(0.3)
    return answer


def test_the_seeds_housing_model_scores_through_its_scoring_uri(account: Account, housing_image, engine) -> None:  # type: ignore[no-untyped-def]
    image, trained, rows = housing_image
    created = _deploy(account, image["Id"], "housing")
    assert created["state"] == "Transitioning"
    service = _wait(account, created["id"], "Healthy", "Failed")
    assert service["state"] == "Healthy", service
    assert service["deploymentStatus"] == {"desiredReplicas": 1, "readyReplicas": 1}
    operation = account.call("GET", f"{account.url}/operations/{created['operationId']}").json()
    assert operation["state"] == "Succeeded"

    primary, secondary = _keys(account, service["id"])
    answer = _wait_scores(service, primary, rows)
    assert answer.json() == pytest.approx(trained.predict(rows).tolist())
    assert _score(service, secondary, rows).status_code == 200
    refused = _score(service, None, rows)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert _score(service, primary[::-1], rows).status_code == 401

    # The replica is contained: no published port, its own network, read-only, no capabilities.
    (container,), (network,) = _held(engine, service["id"])
    info = engine.inspect_container(container["Id"])
    assert info["HostConfig"]["PortBindings"] in (None, {})
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert info["HostConfig"]["CapDrop"] == ["ALL"]
    assert list(info["NetworkSettings"]["Networks"]) == [network["Name"]]
    assert engine.inspect_network(network["Id"])["Internal"] is True

    _delete(account, service["id"])
    assert _held(engine, service["id"]) == ([], [])
    assert _score(service, primary, rows).status_code == 404


def test_an_image_whose_init_raises_fails_the_service_with_its_last_lines(account: Account, engine) -> None:  # type: ignore[no-untyped-def]
    # The build's smoke test runs with HOST set; the replica does not, so only the service fails.
    score = (
        "import os\n"
        "def init():\n"
        "    if 'HOST' not in os.environ:\n"
        "        raise RuntimeError('the feature store is unreachable')\n"
        "def run(raw):\n"
        "    return raw\n"
    )
    manifest = account.manifest(None, score, "# nothing to install\n", name="init-raises")
    image = account.wait(account.build(manifest, "init-raises")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    created = _deploy(account, image["Id"], "init-raises")
    service = _wait(account, created["id"], "Failed", "Healthy", seconds=120)
    assert service["state"] == "Failed"
    assert "RuntimeError: the feature store is unreachable" in service["error"]["message"]
    operation = account.call("GET", f"{account.url}/operations/{created['operationId']}").json()
    assert operation["state"] == "Failed"
    assert _held(engine, service["id"])[0] == []  # its replicas are gone, the reason kept
    _delete(account, service["id"])
    assert _held(engine, service["id"]) == ([], [])


def test_a_killed_replica_is_replaced(account: Account, housing_image, engine) -> None:  # type: ignore[no-untyped-def]
    image, _, rows = housing_image
    service = _wait(account, _deploy(account, image["Id"], "killed")["id"], "Healthy", "Failed")
    assert service["state"] == "Healthy", service
    primary, _ = _keys(account, service["id"])
    _wait_scores(service, primary, rows)
    (container,), _ = _held(engine, service["id"])
    engine.kill(container["Id"])  # the engine leaves it stopped (a manual stop): the reconciler's to replace
    deadline = time.monotonic() + 60
    while True:
        current = [c for c in _held(engine, service["id"])[0] if c["State"] == "running"]
        if current and current[0]["Id"] != container["Id"]:
            break
        assert time.monotonic() < deadline, "the killed replica was never replaced"
        time.sleep(0.5)
    assert _wait(account, service["id"], "Healthy", seconds=60)["deploymentStatus"]["readyReplicas"] == 1
    _wait_scores(service, primary, rows)
    _delete(account, service["id"])


def test_a_deleted_service_keeps_its_addresses_until_no_gateway_routes_to_them(  # type: ignore[no-untyped-def]
    account: Account, housing_image, engine, service_context
) -> None:
    """The gateway routes by the rows of service_replicas, each gateway process keeping them for
    MMS_GATEWAY_CACHE_SECONDS; a freed network's slot goes to the next service that needs one,
    whose first replica then has the deleted one's address. So the network goes only once the
    rows have been gone that long: the deleted service's callers never reach another tenant."""
    from sqlalchemy import func, select

    from app.orm import ServiceReplica

    image, _, rows = housing_image
    service = _wait(account, _deploy(account, image["Id"], "deleted")["id"], "Healthy", "Failed")
    assert service["state"] == "Healthy", service
    _wait_scores(service, _keys(account, service["id"])[0], rows)  # a gateway holds its route now
    account.call("DELETE", f"{account.url}/services/{service['id']}")

    rows_gone = network_gone = None
    deadline = time.monotonic() + 60
    while network_gone is None:
        assert time.monotonic() < deadline, "the service's network was never removed"
        with service_context.session_factory() as session:
            routed = session.scalar(
                select(func.count())
                .select_from(ServiceReplica)
                .where(ServiceReplica.service_id == uuid.UUID(service["id"]))
            )
        now = time.monotonic()
        if rows_gone is None and not routed:
            rows_gone = now
        if not _held(engine, service["id"])[1]:
            network_gone = now
        time.sleep(0.05)
    cache = service_context.settings.gateway_cache_seconds
    assert rows_gone is not None and network_gone - rows_gone >= cache, (rows_gone, network_gone)
    while account.status("GET", f"{account.url}/services/{service['id']}") != 404:
        assert time.monotonic() < deadline, "the service was never deleted"
        time.sleep(0.5)
    assert _held(engine, service["id"]) == ([], [])
