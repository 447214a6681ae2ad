"""Web services on the built-in ``swarm`` target, end to end: the test engine in swarm mode
(made here when it is not one), a real deploy worker whose swarm driver runs each generation
as a swarm service on the service's own bridge, the scoring gateway routing to the tasks.

The swarm is shared with every test session on the engine: each session holds a shared lock
while it uses it; one that finds the engine out of swarm mode makes it a one-node swarm (and
says so in a marker file), and the last session out (the only one that can then take the lock
exclusively) leaves a swarm the tests made and removes the ``docker_gwbridge`` that came with
it. A swarm the tests did not make is never left.
"""

from __future__ import annotations

import fcntl
import json
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import httpx
import pytest

from tests.infra import Infra
from tests.workers.deploy.test_local import _delete, _keys, _wait
from tests.workers.stack import Account, Stack

SERVICE_LABEL = "org.mms.service"
_SWARM_LOCK = Path(tempfile.gettempdir()) / "mms-test-swarm.lock"
_SWARM_INIT_LOCK = Path(tempfile.gettempdir()) / "mms-test-swarm-init.lock"
_SWARM_MADE = Path(tempfile.gettempdir()) / "mms-test-swarm.made"
# init() picks a token: which replica answered.
TOKEN_SCORE = (
    "import secrets\n"
    "def init():\n"
    "    global token\n"
    "    token = secrets.token_hex(8)\n"
    "def run(raw):\n"
    "    return {'token': token}\n"
)


@pytest.fixture(scope="module")
def engine(infra: Infra) -> Iterator[docker.APIClient]:
    api = docker.APIClient(base_url=infra.docker_host, version="auto", timeout=60)
    with _shared_swarm(api):
        yield api
    api.close()


def _swarm_state(api: docker.APIClient) -> str:
    return (api.info().get("Swarm") or {}).get("LocalNodeState") or "inactive"


@contextmanager
def _shared_swarm(api: docker.APIClient) -> Iterator[None]:
    with open(_SWARM_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # while any session holds it, none leaves the swarm
        try:
            with open(_SWARM_INIT_LOCK, "a+") as init:
                fcntl.flock(init, fcntl.LOCK_EX)
                if _swarm_state(api) == "inactive":
                    had_gwbridge = bool(api.networks(names=["docker_gwbridge"]))
                    api.init_swarm(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
                    _SWARM_MADE.write_text(json.dumps({"gwbridge": not had_gwbridge}))
            assert _swarm_state(api) == "active"
            yield
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session uses the swarm: the last one out leaves it
            else:
                _leave_if_made(api)


def _leave_if_made(api: docker.APIClient) -> None:
    if not _SWARM_MADE.exists():
        return  # not the tests' swarm
    made = json.loads(_SWARM_MADE.read_text() or "{}")
    api.leave_swarm(force=True)
    if made.get("gwbridge"):
        deadline = time.monotonic() + 10
        while api.networks(names=["docker_gwbridge"]) and time.monotonic() < deadline:
            try:
                api.remove_network("docker_gwbridge")
            except docker.errors.APIError:
                time.sleep(0.5)
    _SWARM_MADE.unlink()


@pytest.fixture(scope="module")
def account(stack: Stack, engine: docker.APIClient) -> Account:
    stack.start_web_services()
    return Account(stack)


@pytest.fixture(scope="module")
def token_image(account: Account) -> dict:
    manifest = account.manifest(None, TOKEN_SCORE, "# nothing to install\n", name="swarm-token")
    image = account.wait(account.build(manifest, "swarm-token")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    return image


def _deploy(account: Account, image_id: str, name: str, compute: str = "swarm") -> dict:
    created = account.call(
        "POST",
        f"{account.url}/services",
        json={
            "name": name,
            "imageId": image_id,
            "computeName": compute,
            "deploymentConfig": {"containerResourceRequirements": {"cpu": 0.25, "memoryInGB": 0.25}, "numReplicas": 1},
        },
    )
    assert created.status_code == 202
    return created.json()


def _score(service: dict, key: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(service["scoringUri"], json={"data": 1}, headers=headers, timeout=30)


def _token(service: dict, key: str, seconds: float = 30) -> str:
    """A token through the gateway (which reads a route at most its cache period late)."""
    deadline = time.monotonic() + seconds
    while (answer := _score(service, key)).status_code != 200:
        assert time.monotonic() < deadline, f"{answer.status_code} {answer.text}"
        time.sleep(0.3)
    return answer.json()["token"]


def _swarm_held(engine: docker.APIClient, service_id: str) -> dict[str, list]:
    """What the engine holds of the service: swarm services, networks (by label, and its
    swarm-scoped bridge by name), task containers."""
    label = {"label": f"{SERVICE_LABEL}={service_id}"}
    by_name = engine.networks(names=[f"mms-svc-{uuid.UUID(service_id).hex}"])
    return {
        "services": engine.services(filters=label),
        "networks": engine.networks(filters=label) + by_name,
        "containers": engine.containers(all=True, filters=label),
    }


def _running_tasks(engine: docker.APIClient, service_id: str) -> list[dict]:
    (swarm_service,) = engine.services(filters={"label": f"{SERVICE_LABEL}={service_id}"})
    return [
        t
        for t in engine.tasks(filters={"service": swarm_service["ID"]})
        if t["DesiredState"] == "running" and t["Status"]["State"] == "running"
    ]


@pytest.fixture(scope="module")
def service(account: Account, token_image: dict) -> Iterator[dict]:
    created = _deploy(account, token_image["Id"], "on-swarm")
    assert created["computeName"] == "swarm" and created["computeType"] == "swarm"
    yield created
    # When a test stopped before the delete's: its networks are local objects that outlive the swarm.
    if account.status("GET", f"{account.url}/services/{created['id']}") != 404:
        _delete(account, created["id"])


def test_deploy_score_and_keys(account: Account, service: dict, engine: docker.APIClient) -> None:
    computes = account.call("GET", f"{account.url}/computes").json()["value"]
    assert [(c["name"], c["builtIn"]) for c in computes] == [("local", True), ("swarm", True)]
    healthy = _wait(account, service["id"], "Healthy", "Failed", seconds=120)
    assert healthy["state"] == "Healthy", healthy
    assert healthy["deploymentStatus"] == {"desiredReplicas": 1, "readyReplicas": 1}

    primary, secondary = _keys(account, service["id"])
    assert _token(healthy, primary)
    assert _score(healthy, secondary).status_code == 200
    refused = _score(healthy, None)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"

    # One swarm service per generation, contained like a local replica, on the service's own
    # bridge (an mmss+ interface, under the host firewall) with no published port.
    (swarm_service,) = _swarm_held(engine, service["id"])["services"]
    spec = swarm_service["Spec"]
    assert spec["Name"] == f"mms-{uuid.UUID(service['id']).hex[:12]}-g1"
    assert not (swarm_service.get("Endpoint") or {}).get("Ports")
    container_spec = spec["TaskTemplate"]["ContainerSpec"]
    assert container_spec["ReadOnly"] is True and container_spec["CapabilityDrop"] == ["ALL"]
    assert "@sha256:" in container_spec["Image"]
    assert spec["TaskTemplate"]["Resources"]["Limits"]["Pids"] > 0
    (task,) = _running_tasks(engine, service["id"])
    info = engine.inspect_container(task["Status"]["ContainerStatus"]["ContainerID"])
    (network_name,) = info["NetworkSettings"]["Networks"]
    (config_only,) = [n for n in _swarm_held(engine, service["id"])["networks"] if n.get("ConfigOnly")]
    bridge = config_only["Options"]["com.docker.network.bridge.name"]
    assert bridge == f"mmss{uuid.UUID(service['id']).hex[:10]}"
    assert network_name == f"mms-svc-{uuid.UUID(service['id']).hex}"
    assert info["NetworkSettings"]["Networks"][network_name]["IPAddress"].startswith("10.213.")


def test_scaled_to_two_both_replicas_serve(account: Account, service: dict, engine: docker.APIClient) -> None:
    account.call("PATCH", f"{account.url}/services/{service['id']}", json={"numReplicas": 2})
    scaled = _wait(account, service["id"], "Healthy", "Failed", seconds=60)
    assert scaled["deploymentStatus"] == {"desiredReplicas": 2, "readyReplicas": 2}, scaled
    assert len(_running_tasks(engine, service["id"])) == 2
    primary, _ = _keys(account, service["id"])
    tokens: set[str] = set()
    deadline = time.monotonic() + 30
    while len(tokens) < 2 and time.monotonic() < deadline:
        tokens.add(_token(scaled, primary))
    assert len(tokens) == 2, f"only one replica answered: {tokens}"


def test_a_killed_task_is_replaced(account: Account, service: dict, engine: docker.APIClient) -> None:
    primary, _ = _keys(account, service["id"])
    before = {t["ID"] for t in _running_tasks(engine, service["id"])}
    victim = _running_tasks(engine, service["id"])[0]
    engine.kill(victim["Status"]["ContainerStatus"]["ContainerID"])
    deadline = time.monotonic() + 60
    while True:
        running = {t["ID"] for t in _running_tasks(engine, service["id"])}
        if len(running) == 2 and victim["ID"] not in running and running - before:
            break
        assert time.monotonic() < deadline, "swarm never replaced the killed task"
        time.sleep(0.5)
    healthy = _wait(account, service["id"], "Healthy", seconds=60)
    assert healthy["deploymentStatus"]["readyReplicas"] == 2
    # The gateway routes to the new task's address (a new one) within its cache period.
    tokens: set[str] = set()
    deadline = time.monotonic() + 30
    while len(tokens) < 2 and time.monotonic() < deadline:
        tokens.add(_token(healthy, primary))
    assert len(tokens) == 2


def test_an_update_moves_traffic_to_a_new_generation_without_a_failed_request(
    account: Account, service: dict, engine: docker.APIClient
) -> None:
    score = TOKEN_SCORE.replace("return {'token': token}", "return {'token': token, 'version': 2}")
    manifest = account.manifest(None, score, "# nothing to install\n", name="swarm-token-v2")
    image = account.wait(account.build(manifest, "swarm-token-v2")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    primary, _ = _keys(account, service["id"])
    healthy = _wait(account, service["id"], "Healthy", seconds=30)
    patched = account.call("PATCH", f"{account.url}/services/{service['id']}", json={"imageId": image["Id"]})
    operation = f"{account.url}/operations/{patched.json()['operationId']}"
    # Bounded load from the PATCH until the operation ends: every answer a 200, v1's then v2's.
    versions: list[tuple[float, int]] = []
    statuses: set[int] = set()
    deadline = time.monotonic() + 90
    while account.call("GET", operation).json()["state"] == "Running" and len(versions) < 3000:
        assert time.monotonic() < deadline, "the update never ended"
        answer = _score(healthy, primary)
        statuses.add(answer.status_code)
        if answer.status_code == 200:
            versions.append((time.monotonic(), answer.json().get("version", 1)))
    assert account.call("GET", operation).json()["state"] == "Succeeded"
    assert statuses <= {200}, statuses
    # Every gateway reads the new route within its cache period (2 s).
    deadline = time.monotonic() + 10
    while _score(healthy, primary).json().get("version") != 2:
        assert time.monotonic() < deadline, "v2 never answered"
        time.sleep(0.2)
    # After the flip, v1 answers only while gateways still hold the old route (their cache period).
    first_v2 = min((at for at, version in versions if version == 2), default=time.monotonic())
    assert [at for at, version in versions if version == 1 and at > first_v2 + 5] == []
    names = {s["Spec"]["Name"] for s in _swarm_held(engine, service["id"])["services"]}
    assert f"mms-{uuid.UUID(service['id']).hex[:12]}-g2" in names


def test_a_delete_leaves_nothing_in_the_swarm(account: Account, service: dict, engine: docker.APIClient) -> None:
    assert all(_swarm_held(engine, service["id"]).values())
    _delete(account, service["id"])
    assert _swarm_held(engine, service["id"]) == {"services": [], "networks": [], "containers": []}


def test_a_generation_whose_tasks_keep_failing_fails_the_service_with_its_last_lines(
    account: Account, engine: docker.APIClient
) -> None:
    # The build's smoke test runs with HOST set; a task does not, so only the service fails.
    score = (
        "import os\n"
        "def init():\n"
        "    if 'HOST' not in os.environ:\n"
        "        raise RuntimeError('the feature store is unreachable')\n"
        "def run(raw):\n"
        "    return raw\n"
    )
    manifest = account.manifest(None, score, "# nothing to install\n", name="swarm-init-raises")
    image = account.wait(account.build(manifest, "swarm-init-raises")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    created = _deploy(account, image["Id"], "swarm-init-raises")
    failed = _wait(account, created["id"], "Failed", "Healthy", seconds=90)
    assert failed["state"] == "Failed"
    assert "times before one answered GET /" in failed["error"]["message"]
    assert "RuntimeError: the feature store is unreachable" in failed["error"]["message"]
    assert _swarm_held(engine, created["id"])["services"] == []  # its generation is gone, the reason kept
    _delete(account, created["id"])
    assert _swarm_held(engine, created["id"]) == {"services": [], "networks": [], "containers": []}


def test_an_unreachable_swarm_is_named() -> None:
    from workers.deploy.local import EngineUnreachable
    from workers.deploy.swarm import SwarmDriver

    settings = {"installation": "test", "subnet_pool": "10.213.0.0/16", "tmp_mb": 16, "pids": 64}
    with pytest.raises(EngineUnreachable, match="swarm's engine did not answer"):
        SwarmDriver("tcp://127.0.0.1:9", **settings)


def test_a_deleted_accounts_services_leave_nothing_in_the_swarm(
    stack: Stack, engine: docker.APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account deleted with ?force=true takes its services' rows at once; the orphan sweep
    (the deploy workers' beat, every minute; called here) removes their swarm services, then,
    one sweep later, their networks."""
    from app.config import Settings
    from app.context import ServiceContext
    from workers.deploy.reconcile import sweep_orphans

    stack.start_web_services()
    doomed = Account(stack)
    manifest = doomed.manifest(None, TOKEN_SCORE, "# nothing to install\n", name="swarm-doomed")
    image = doomed.wait(doomed.build(manifest, "swarm-doomed")["Id"])
    assert image["CreationState"] == "Succeeded", doomed.log(image)
    created = _deploy(doomed, image["Id"], "doomed")
    assert _wait(doomed, created["id"], "Healthy", "Failed", seconds=90)["state"] == "Healthy"
    assert all(_swarm_held(engine, created["id"]).values())
    assert doomed.call("DELETE", f"{doomed.url}?force=true").status_code in (200, 202, 204)

    for name, value in stack.env.items():
        if name.startswith("MMS_"):
            monkeypatch.setenv(name, value)
    context = ServiceContext.build(Settings())
    try:
        swept = sweep_orphans(context)
        assert uuid.UUID(created["id"]) in swept
        assert _swarm_held(engine, created["id"])["services"] == []
        deadline = time.monotonic() + 60
        while _swarm_held(engine, created["id"]) != {"services": [], "networks": [], "containers": []}:
            assert time.monotonic() < deadline, _swarm_held(engine, created["id"])
            sweep_orphans(context)
            time.sleep(1)
    finally:
        context.dispose()
