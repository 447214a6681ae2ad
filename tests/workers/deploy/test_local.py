"""Web services on the ``local`` target, end to end: the API records a service, a real deploy
worker (the reconciler) starts contained replicas on the test engine, the scoring gateway
routes to them with a key; failures are states, a killed replica is replaced, a delete leaves
nothing in the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Self

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
    # What the replica printed is copied for GET .../logs (within a pass or two).
    deadline = time.monotonic() + 30
    while "Uvicorn running" not in (logs := account.call("GET", f"{account.url}/services/{service['id']}/logs").text):
        assert time.monotonic() < deadline, logs
        time.sleep(1)

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
    logs = account.call("GET", f"{account.url}/services/{service['id']}/logs").text
    assert "RuntimeError: the feature store is unreachable" in logs and logs.startswith("g1 ")
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


# The build's smoke test sets HOST; a replica does not: only the deployed service fails.
_RAISE_WITHOUT_HOST = "    if 'HOST' not in os.environ:\n        raise ValueError('version 3 needs a setting')\n"


def _versioned_image(account: Account, version: int, *, init_raises: bool = False) -> str:
    """An image whose run() says which version it is and which replica answered."""
    score = (
        "import os, secrets\n"
        "def init():\n"
        "    global replica\n"
        "    replica = secrets.token_hex(4)\n" + (_RAISE_WITHOUT_HOST if init_raises else "") + "def run(raw):\n"
        f"    return {{'version': {version}, 'replica': replica}}\n"
    )
    manifest = account.manifest(None, score, "# nothing to install\n", name=f"versioned-{version}")
    image = account.wait(account.build(manifest, f"versioned-{version}")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    return image["Id"]


class Load:
    """Two client threads scoring in a loop until stopped (at most 60 s or 3000 requests):
    every answer recorded as (time, status, version or the error)."""

    def __init__(self, service: dict, key: str) -> None:
        self.service, self.key = service, key
        self.answers: list[tuple[float, int, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(2)]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=35)

    def _loop(self) -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < deadline and len(self.answers) < 3000:
                try:
                    answer = client.post(self.service["scoringUri"], json={"data": 1})
                    body = answer.json().get("version") if answer.status_code == 200 else answer.text
                    self.answers.append((time.monotonic(), answer.status_code, body))
                except httpx.HTTPError as exc:
                    self.answers.append((time.monotonic(), 0, repr(exc)))
                time.sleep(0.01)


def test_an_update_under_load_fails_no_request_and_a_failed_one_rolls_back(account: Account, engine) -> None:  # type: ignore[no-untyped-def]
    v1, v2, v3 = (_versioned_image(account, n, init_raises=n == 3) for n in (1, 2, 3))
    created = account.call(
        "POST",
        f"{account.url}/services",
        json={
            "name": "rolling",
            "imageId": v1,
            # A short scoring timeout: the old generation drains for 2 x cache + it + 1 s.
            "deploymentConfig": {"numReplicas": 1, "scoringTimeoutMs": 3000},
        },
    ).json()
    service = _wait(account, created["id"], "Healthy", "Failed")
    assert service["state"] == "Healthy", service
    primary, _ = _keys(account, service["id"])
    _wait_scores(service, primary, 1)

    with Load(service, primary) as load:
        time.sleep(1)
        update = account.call("PATCH", f"{account.url}/services/{service['id']}", json={"imageId": v2})
        assert update.status_code == 202
        operation = update.json()["operationId"]
        deadline = time.monotonic() + 120
        while (ended := account.call("GET", f"{account.url}/operations/{operation}").json())["state"] == "Running":
            assert time.monotonic() < deadline, "the update never ended"
            time.sleep(0.5)
        assert ended["state"] == "Succeeded", ended
        time.sleep(3)  # past every gateway's cache period
    failed = [a for a in load.answers if a[1] != 200]
    assert not failed, failed[:5]
    versions = [version for _, _, version in load.answers]
    assert versions[0] == 1 and versions[-1] == 2 and len(versions) > 20
    switched = next(t for t, _, version in load.answers if version == 2)
    assert all(version == 2 for t, _, version in load.answers if t > switched + 2.5)  # no v1 after the switch
    # The old generation drains, then goes.
    deadline = time.monotonic() + 30
    while len(_held(engine, service["id"])[0]) != 1:
        assert time.monotonic() < deadline, "the old generation was never removed"
        time.sleep(0.5)

    # v3's init() raises: the update (an image swap and a resize) is rolled back, v2 serves on throughout.
    with Load(service, primary) as load:
        resized = {"imageId": v3, "containerResourceRequirements": {"cpu": 0.25, "memoryInGB": 0.75}}
        update = account.call("PATCH", f"{account.url}/services/{service['id']}", json=resized)
        operation = update.json()["operationId"]
        deadline = time.monotonic() + 120
        while (ended := account.call("GET", f"{account.url}/operations/{operation}").json())["state"] == "Running":
            assert time.monotonic() < deadline, "the update never ended"
            time.sleep(0.5)
    assert ended["state"] == "Failed" and "ValueError: version 3 needs a setting" in ended["error"]["message"]
    assert {status for _, status, _ in load.answers} == {200}
    assert {version for _, _, version in load.answers} == {2}
    service = account.call("GET", f"{account.url}/services/{service['id']}").json()
    assert (service["state"], service["imageId"]) == ("Healthy", v2)
    assert service["containerResourceRequirements"] == {"cpu": 0.1, "memoryInGB": 0.5}  # what v2 runs with
    assert "rolled back" in service["error"]["message"]
    _delete(account, service["id"])


def test_scaled_to_two_replicas_both_serve(account: Account, engine) -> None:  # type: ignore[no-untyped-def]
    image = _versioned_image(account, 1)
    service = _wait(account, _deploy(account, image, "scaled")["id"], "Healthy", "Failed")
    assert service["state"] == "Healthy", service
    primary, _ = _keys(account, service["id"])
    account.call("PATCH", f"{account.url}/services/{service['id']}", json={"numReplicas": 2})
    service = _wait(account, service["id"], "Healthy", "Failed", "Unhealthy")
    assert service["deploymentStatus"] == {"desiredReplicas": 2, "readyReplicas": 2}, service
    assert len(_held(engine, service["id"])[0]) == 2
    replicas = set()
    deadline = time.monotonic() + 30
    while len(replicas) < 2:
        assert time.monotonic() < deadline, f"only {replicas} answered"
        answer = _score(service, primary, [])
        if answer.status_code == 200:
            replicas.add(answer.json()["replica"])
    _delete(account, service["id"])


def _cli(web: Stack, config_dir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MMS_")},
        "MMS_CONFIG_DIR": str(config_dir),
        "MMS_SERVER": web.api,
        "MMS_TOKEN": web.headers["Authorization"].removeprefix("Bearer "),
    }
    return subprocess.run(
        [sys.executable, "-m", "mms_client", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_seeds_flow_mms_model_deploy_builds_and_deploys_in_one_command(
    web: Stack,
    account: Account,
    model,
    tmp_path: Path,
    engine,  # type: ignore[no-untyped-def]
) -> None:
    trained, rows, archive = model
    register_model(account, archive)  # housing.model, the next version
    versions = account.call("GET", f"{account.url}/models", params={"name": "housing.model"}).json()["value"]
    version = max(m["version"] for m in versions)
    (tmp_path / "score.py").write_text(SCORE_PY)
    (tmp_path / "myenv.yml").write_text(
        f"name: housing\ndependencies:\n  - python=3.11\n  - pip:\n    - {sklearn_requirements().strip()}\n"
    )
    (tmp_path / "inferenceconfig.json").write_text(
        json.dumps({"entryScript": "score.py", "runtime": "python", "condaFile": "myenv.yml"})
    )
    (tmp_path / "deploymentconfig.json").write_text(
        json.dumps({"computeType": "local", "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 0.5}})
    )
    config = tmp_path / "config"
    *_, subscription, _, group, _, name = account.url.split("/")
    assert _cli(web, config, "env", "set", "-s", subscription, "-g", group, "-n", name).returncode == 0
    done = _cli(
        web, config, "model", "deploy", "-n", "seeds-housing", "-m", f"housing.model:{version}",
        "--ic", str(tmp_path / "inferenceconfig.json"), "--dc", str(tmp_path / "deploymentconfig.json"),
        "--ct", "local", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    service = json.loads(done.stdout)
    assert service["state"] == "Healthy" and service["scoringUri"], service
    assert "smoke test passed" in done.stderr  # the build log was followed
    primary, _ = _keys(account, service["id"])
    assert _wait_scores(service, primary, rows).json() == pytest.approx(trained.predict(rows).tolist())

    missing = _cli(web, config, "model", "deploy", "-n", "nope", "-m", "housing.model:999", "--ic",
                   str(tmp_path / "inferenceconfig.json"))  # fmt: skip
    assert missing.returncode == 2 and "no model 'housing.model' with version 999" in missing.stderr
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


def test_force_is_refused_on_local_and_a_plain_delete_removes_everything(  # type: ignore[no-untyped-def]
    account: Account, engine
) -> None:
    """`DELETE .../services/{id}?force=true` on `local` is refused: forgotten at once, its
    replicas and network would outlive the row (and the account's cap) until the orphan sweep.
    The service serves on, and its plain delete, which the worker's own engine always completes,
    leaves nothing."""
    manifest = account.manifest(None, SCORE_PY_PLAIN, "# nothing to install\n", name="forced")
    image = account.wait(account.build(manifest, "forced")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    service = _wait(account, _deploy(account, image["Id"], "forced")["id"], "Healthy", "Failed")
    assert service["state"] == "Healthy", service
    forced = f"{account.url}/services/{service['id']}?force=true"
    refused = httpx.delete(forced, headers=account.stack.headers, timeout=60)
    assert (refused.status_code, refused.json()["code"]) == (409, "ForceDeleteNotAllowed"), refused.text
    assert account.call("GET", f"{account.url}/services/{service['id']}").json()["state"] == "Healthy"
    assert all(_held(engine, service["id"]))
    _delete(account, service["id"])
    assert _held(engine, service["id"]) == ([], [])


SCORE_PY_PLAIN = "def init():\n    pass\n\ndef run(raw):\n    return {'ok': True}\n"
