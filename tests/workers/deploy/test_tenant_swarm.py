"""Web services on a swarm a tenant attached, end to end: a second dockerd in a network
namespace of the test's own (tests/workers/deploy/netns_swarm.py) is the tenant's one-node
swarm, reached over TLS at an address of its own; the API attaches it, a real deploy worker runs
each generation there as a swarm service whose tasks publish the replica port in host mode, and
the scoring gateway routes to them at the manager's checked address."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import docker
import httpx
import pytest
from sqlalchemy import delete, select, update

from app.context import ServiceContext
from app.deployments.cluster_cleanup import FIRST_TRY_SECONDS
from app.orm import ClusterCleanup
from app.orm.base import utcnow
from tests.infra import Infra
from tests.workers.deploy.netns_swarm import MANAGER_NAME, TenantSwarm, tenant_swarm
from tests.workers.deploy.test_local import _delete, _wait
from tests.workers.stack import SCORE_PY, Account, Stack, register_model, sklearn_requirements
from workers.deploy.local import EngineUnreachable
from workers.deploy.reconcile import clean_up_deleted_accounts
from workers.deploy.tenant_swarm import swarm_driver_at

pytestmark = pytest.mark.usefixtures("swarm_tools")  # tests/workers/deploy/conftest.py

SERVICE_LABEL = "org.mms.service"


@pytest.fixture(scope="module")
def tenant(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantSwarm]:
    registry_port = int(infra.registry.rpartition(":")[2])
    with tenant_swarm(tmp_path_factory.mktemp("tenant"), registry_port=registry_port) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def stack(infra: Infra, service_context, tmp_path_factory: pytest.TempPathFactory, tenant: TenantSwarm):  # type: ignore[no-untyped-def]
    """The tests' stack, allowed to reach the tenant's manager (a private address here)."""
    from tests.workers.stack import running_stack

    yield from running_stack(infra, service_context, tmp_path_factory, allow_hosts=[tenant.address])


@pytest.fixture(scope="module")
def account(stack: Stack) -> Account:
    stack.start_web_services()
    return Account(stack)


@pytest.fixture(scope="module")
def housing_image(account: Account, model) -> tuple[dict, object, list]:  # type: ignore[no-untyped-def]
    trained, rows, archive = model
    model_id = register_model(account, archive)
    manifest = account.manifest(model_id, SCORE_PY, sklearn_requirements(), name="housing-tenant-swarm")
    image = account.wait(account.build(manifest, "housing-tenant-swarm")["Id"])
    assert image["CreationState"] == "Succeeded", account.log(image)
    return image, trained, rows


def _attach(account: Account, name: str, docker_host: str, tls: dict[str, str]) -> httpx.Response:
    body = {"type": "swarm", "properties": {"dockerHost": docker_host, "tls": tls}}
    return account.call("PUT", f"{account.url}/computes/{name}", json=body)


def _deploy(account: Account, image_id: str, name: str, compute: str, *, auth: bool | None = False) -> httpx.Response:
    config: dict = {"containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 0.5}, "numReplicas": 1}
    if auth is not None:
        config["authEnabled"] = auth
    body = {"name": name, "imageId": image_id, "computeName": compute, "deploymentConfig": config}
    return httpx.post(f"{account.url}/services", json=body, headers=account.stack.headers, timeout=60)


def _held(api: docker.APIClient, service_id: str) -> dict[str, list]:
    label = {"label": f"{SERVICE_LABEL}={service_id}"}
    return {
        "services": api.services(filters=label),
        "containers": api.containers(all=True, filters=label),
        "networks": api.networks(filters=label),
    }


def test_the_housing_model_scores_on_a_tenants_swarm_and_a_delete_leaves_nothing_there(
    account: Account, housing_image, tenant: TenantSwarm, infra: Infra
) -> None:  # type: ignore[no-untyped-def]
    image, trained, rows = housing_image
    assert _attach(account, "theirs", tenant.docker_host, tenant.tls).status_code == 201
    created = _deploy(account, image["Id"], "on-their-swarm", "theirs")
    assert created.status_code == 202, created.text
    service_id = created.json()["id"]
    started = time.monotonic()
    healthy = _wait(account, service_id, "Healthy", "Failed", seconds=180)
    assert healthy["state"] == "Healthy", healthy
    print(f"tenant swarm: POST -> Healthy in {time.monotonic() - started:.1f} s")
    assert healthy["computeType"] == "swarm" and healthy["authEnabled"] is False

    # Scored through the scoringUri (the gateway), no key asked for.
    deadline = time.monotonic() + 30
    while (answer := httpx.post(healthy["scoringUri"], json={"data": rows}, timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, f"{answer.status_code} {answer.text}"
        time.sleep(0.3)
    assert answer.json() == pytest.approx(trained.predict(rows).tolist())

    # On the tenant's swarm (one node): one swarm service, contained, on the manager, its
    # port published in host mode (no routing mesh, no VIP); the task answers at the manager's address.
    (swarm_service,) = _held(tenant.api, service_id)["services"]
    spec = swarm_service["Spec"]
    assert spec["Name"] == f"mms-{uuid.UUID(service_id).hex[:12]}-g1"
    assert spec["EndpointSpec"]["Mode"] == "dnsrr"
    (port,) = spec["EndpointSpec"]["Ports"]
    assert port["PublishMode"] == "host" and port["TargetPort"] == 5001
    # One node, the manager: no other node to keep tasks off (test_multinode_swarm.py has two).
    assert spec["TaskTemplate"].get("Placement", {}).get("Constraints") in (None, [])
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert container["ReadOnly"] is True and container["CapabilityDrop"] == ["ALL"]
    assert "@sha256:" in container["Image"]
    (task,) = [t for t in tenant.api.tasks(filters={"service": swarm_service["ID"]}) if t["DesiredState"] == "running"]
    published = task["Status"]["PortStatus"]["Ports"][0]["PublishedPort"]
    assert httpx.get(f"http://{tenant.address}:{published}/", timeout=10).status_code == 200
    # Nothing of it on the operator's engine (which need not be a swarm).
    operator = infra.api()
    label = {"label": f"{SERVICE_LABEL}={service_id}"}
    try:
        assert operator.containers(all=True, filters=label) == [] and operator.networks(filters=label) == []
    finally:
        operator.close()

    _delete(account, service_id)
    assert _held(tenant.api, service_id) == {"services": [], "containers": [], "networks": []}


def test_key_auth_is_refused_on_a_tenants_swarm(account: Account, housing_image, tenant: TenantSwarm) -> None:  # type: ignore[no-untyped-def]
    image, _, _ = housing_image
    assert _attach(account, "theirs-keys", tenant.docker_host, tenant.tls).status_code in (200, 201)
    for auth in (None, True):  # authEnabled defaults to true
        refused = _deploy(account, image["Id"], "keyed", "theirs-keys", auth=auth)
        assert refused.status_code == 400, refused.text
        assert "deploymentConfig.authEnabled" in refused.text and "around the scoring gateway" in refused.text
    assert account.call("GET", f"{account.url}/services", params={"computeName": "theirs-keys"}).json()["value"] == []


def test_a_manager_that_resolves_to_a_refused_address_fails_the_service(
    account: Account, housing_image, tenant: TenantSwarm
) -> None:  # type: ignore[no-untyped-def]
    """The API judges only an address written out; a name is judged by the worker when it
    connects: here one that leads to the host's loopback, which no operator allowed. A delete
    goes to the target too (what a pass made is found there by label): it waits until the
    tenant points the target somewhere the worker may go."""
    image, _, _ = housing_image
    tls = {"ca": _PEM, "cert": _PEM, "key": _PEM}
    assert _attach(account, "loopback", "tcp://localhost:2376", tls).status_code == 201
    created = _deploy(account, image["Id"], "on-loopback", "loopback")
    assert created.status_code == 202, created.text
    failed = _wait(account, created.json()["id"], "Failed", "Healthy", seconds=60)
    assert failed["state"] == "Failed"
    assert "its manager localhost:2376 is refused" in failed["error"]["message"]
    assert "loopback" in failed["error"]["message"]
    account.call("DELETE", f"{account.url}/services/{created.json()['id']}")
    time.sleep(3)
    assert account.call("GET", f"{account.url}/services/{created.json()['id']}").json()["state"] == "Deleting"
    assert _attach(account, "loopback", tenant.docker_host, tenant.tls).status_code == 200
    _delete(account, created.json()["id"])


def test_a_manager_that_refuses_our_certificate_leaves_the_service_unhealthy_and_no_key_in_its_error(
    account: Account, housing_image, tenant: TenantSwarm, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Another CA's client certificate: the manager refuses the handshake; the service says its
    engine did not answer, and neither the key nor the certificate shows anywhere."""
    from tests.workers.deploy.netns_swarm import _certificates

    other = _certificates(tmp_path, tenant.address)
    wrong = {"ca": tenant.tls["ca"], "cert": other["cert"], "key": other["key"]}
    assert _attach(account, "theirs-wrong", tenant.docker_host, wrong).status_code == 201
    image, _, _ = housing_image
    created = _deploy(account, image["Id"], "wrong-cert", "theirs-wrong")
    assert created.status_code == 202
    service_id = created.json()["id"]
    unhealthy = _wait(account, service_id, "Unhealthy", "Healthy", "Failed", seconds=60)
    assert unhealthy["state"] == "Unhealthy", unhealthy
    assert "did not answer" in unhealthy["error"]["message"]
    shown = account.call("GET", f"{account.url}/computes/theirs-wrong").text + str(unhealthy)
    assert "PRIVATE KEY" not in shown and "CERTIFICATE" not in shown
    assert _attach(account, "theirs-wrong", tenant.docker_host, tenant.tls).status_code == 200  # fixed
    healthy = _wait(account, service_id, "Healthy", "Failed", seconds=180)
    assert healthy["state"] == "Healthy", healthy
    _delete(account, service_id)
    assert _held(tenant.api, service_id) == {"services": [], "containers": [], "networks": []}


def test_the_engine_connection_goes_to_the_address_the_policy_checked(
    tenant: TenantSwarm, service_context: ServiceContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the manager's name answers the policy's lookup with the tenant's address,
    and every later lookup (the process's resolver: urllib3's too) with an address nothing
    answers at. The driver works, so its connection went to the address checked, the name never
    looked up again; and a name the manager's certificate does not carry, at that same
    address, is refused: the certificate is checked against the name, not the address. (The
    address is allowed as such too: a name's address alone takes no scoring traffic,
    test_tenant_swarm_addresses.py.)"""
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(host, str) and host.endswith(".tenant-swarm.test"):
            lookups.append(host)
            host = tenant.address if len(lookups) == 1 else "192.0.2.1"  # TEST-NET-1
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    other = "other.tenant-swarm.test"
    settings = service_context.settings.model_copy(update={"fetch_allow_hosts": [MANAGER_NAME, other, tenant.address]})
    context = ServiceContext.build(settings)
    try:
        with swarm_driver_at(
            context,
            docker_host=f"tcp://{MANAGER_NAME}:2376",
            tls=tenant.tls,
            installation="rebinding-test",
            target="compute 'named'",
            resolver=rebinding,
        ) as driver:
            assert driver._api.info()["Swarm"]["NodeID"] == tenant.api.info()["Swarm"]["NodeID"]
        assert lookups == [MANAGER_NAME]

        lookups.clear()
        with (
            pytest.raises(EngineUnreachable, match="did not answer"),
            swarm_driver_at(
                context,
                docker_host=f"tcp://{other}:2376",
                tls=tenant.tls,
                installation="rebinding-test",
                target="compute 'other'",
                resolver=rebinding,
            ),
        ):
            pass
        assert lookups == [other]
    finally:
        context.dispose()


def test_a_force_deleted_accounts_services_are_removed_from_its_swarm_or_retried_with_a_redacted_error(
    account: Account, housing_image, tenant: TenantSwarm, service_context: ServiceContext
) -> None:  # type: ignore[no-untyped-def]
    """Last in this module: it deletes the module's account. The delete keeps, in its
    transaction, a sealed copy of each tenant-swarm service's TLS material and manager; the
    deploy sweep removes the service's swarm services from the tenant's engine, and a manager
    that does not answer is tried again later with an error free of the TLS material."""
    image, _, _ = housing_image
    assert _attach(account, "theirs-last", tenant.docker_host, tenant.tls).status_code in (200, 201)
    # The same manager's address on a port nothing listens on: the target is away.
    gone_host = f"tcp://{tenant.address}:2999"
    assert _attach(account, "theirs-gone", gone_host, tenant.tls).status_code == 201
    running = _deploy(account, image["Id"], "still-running", "theirs-last")
    away = _deploy(account, image["Id"], "on-a-gone-swarm", "theirs-gone")
    assert running.status_code == away.status_code == 202, running.text + away.text
    running_id, away_id = running.json()["id"], away.json()["id"]
    assert _wait(account, running_id, "Healthy", "Failed", seconds=180)["state"] == "Healthy"
    assert _held(tenant.api, running_id)["services"] != []

    response = httpx.delete(f"{account.url}?force=true", headers=account.stack.headers, timeout=60)
    assert response.status_code == 204, response.text
    try:
        rows = _cleanups(service_context, running_id, away_id)
        assert set(rows) == {running_id, away_id}
        assert (rows[running_id].compute_type, rows[running_id].docker_host) == ("swarm", tenant.docker_host)
        assert (rows[away_id].compute_type, rows[away_id].docker_host) == ("swarm", gone_host)
        assert all("PRIVATE KEY" not in r.sealed_credentials for r in rows.values())  # sealed
        # Their first try waits out any pass still at work on the services: as if that long passed.
        assert all(r.next_attempt_at > utcnow() + timedelta(seconds=FIRST_TRY_SECONDS - 60) for r in rows.values())
        with service_context.session_factory.begin() as session:
            session.execute(
                update(ClusterCleanup)
                .where(ClusterCleanup.id.in_([r.id for r in rows.values()]))
                .values(next_attempt_at=utcnow())
            )

        # The tests' process sweeps (the stack's worker does too, every minute: a claim is one
        # conditional update, so whichever comes first tries each row once).
        allowed = service_context.settings.model_copy(update={"fetch_allow_hosts": [tenant.address]})
        sweeper = ServiceContext.build(allowed)
        try:
            before = utcnow()
            deadline = time.monotonic() + 90
            while running_id in _cleanups(service_context, running_id):
                assert time.monotonic() < deadline, _cleanups(service_context, running_id)
                clean_up_deleted_accounts(sweeper)
                time.sleep(1)
        finally:
            sweeper.dispose()
        assert _held(tenant.api, running_id) == {"services": [], "containers": [], "networks": []}
        assert list(_cleanups(service_context, running_id, away_id)) == [away_id]
        left = _cleanups(service_context, away_id)[away_id]
        assert left.attempts >= 1
        assert left.next_attempt_at >= before + timedelta(seconds=55)
        assert "did not answer" in (left.last_error or ""), left.last_error
        key_line = tenant.tls["key"].splitlines()[1]
        assert "PRIVATE KEY" not in (left.last_error or "") and key_line not in (left.last_error or "")
    finally:  # the database outlives the session: the rows other tests' sweeps would see
        with service_context.session_factory.begin() as session:
            ids = [uuid.UUID(running_id), uuid.UUID(away_id)]
            session.execute(delete(ClusterCleanup).where(ClusterCleanup.service_id.in_(ids)))


def _cleanups(context: ServiceContext, *service_ids: str) -> dict[str, ClusterCleanup]:
    """The cleanup rows of these services (the database outlives a session: rows of others too)."""
    with context.session_factory() as session:
        query = select(ClusterCleanup).where(ClusterCleanup.service_id.in_([uuid.UUID(s) for s in service_ids]))
        return {str(row.service_id): row for row in session.scalars(query)}


_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
