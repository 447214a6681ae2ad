"""Web services on an attached kubernetes target through the real reconcile pass
(workers.deploy.reconcile.reconcile_service): the API attaches the target and takes the
service, each pass connects with the target's sealed kubeconfig to a fake API server on
loopback (tests/workers/deploy/fake_kube_api.py: no cluster can run here, so this target is
tested against that fake only, never a live cluster), and the test plays the cluster's
controllers (pods, a Deployment's status). Every applied object is validated against the 1.37
schema by the fake; each test asserts it saw no fault."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.deployments import reconciler
from app.deployments.reconciler import FAILED_SECONDS, STEADY_SECONDS
from app.orm import Event
from app.orm import Service as ServiceRow
from app.orm.base import utcnow
from tests.api.test_manifests import seed_manifest
from tests.api.test_services import built_image
from tests.factories import Callers, model_body, new_account
from tests.workers.deploy.fake_kube_api import FakeKubeApi, fake_kube_api
from workers.deploy.reconcile import reconcile_service

TOKEN = "fake-cluster-token-never-in-a-log"
PUSH_PASSWORD = "operator-push-password-never-in-a-cluster"
TRACEBACK = [
    "2026-12-04T10:00:00.000000001Z Traceback (most recent call last):",
    '2026-12-04T10:00:00.000000002Z   File "/var/azureml-app/score.py", line 3, in init',
    "2026-12-04T10:00:00.000000003Z ValueError: the model file is corrupt",
]


@pytest.fixture()
def fake(tmp_path: Path) -> Iterator[FakeKubeApi]:
    with fake_kube_api(tmp_path, TOKEN) as api:
        yield api
        assert api.violations == []
        # The operator's registry login (for pushing every tenant's images) never reaches a cluster.
        assert not any(PUSH_PASSWORD.encode() in seen.body for seen in api.seen)


@pytest.fixture()
def context(app_context: ServiceContext, fake: FakeKubeApi) -> ServiceContext:
    """The workers' context: the operator allows the fake's loopback address, and has a
    registry login (which a kubernetes target must never be handed)."""
    settings = app_context.settings.model_copy(
        update={
            "fetch_allow_hosts": [f"127.0.0.1:{fake.port}"],
            "registry_username": "pusher",
            "registry_password": PUSH_PASSWORD,
        }
    )
    return ServiceContext.build(
        settings,
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )


@pytest.fixture()
def owner(callers: Callers) -> dict[str, str]:
    return callers.headers()


@pytest.fixture()
def account(client: TestClient, owner: dict[str, str]) -> str:
    return new_account(client, owner)


@pytest.fixture()
def images(client: TestClient, db: Session, account: str, owner: dict[str, str]) -> list[str]:
    """Two built images: the first deployed, the second an update."""
    model_id = client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]
    manifest_id = client.post(f"{account}/manifests", json=seed_manifest(model_id), headers=owner).json()["id"]
    return [built_image(client, db, account, owner, manifest_id) for _ in range(2)]


def _attach(client: TestClient, account: str, owner: dict[str, str], kubeconfig: str) -> None:
    body = {"type": "kubernetes", "properties": {"kubeconfig": kubeconfig, "namespace": "tenant-a"}}
    assert client.put(f"{account}/computes/aks", json=body, headers=owner).status_code == 201


def _deploy(client: TestClient, account: str, owner: dict[str, str], image_id: str, **config: Any) -> dict:
    config = {"numReplicas": 2, "authEnabled": False} | config
    body = {"name": "housing", "imageId": image_id, "computeName": "aks", "deploymentConfig": config}
    created = client.post(f"{account}/services", json=body, headers=owner)
    assert created.status_code == 202, created.text
    return created.json()


class Service:
    """A service through the API, and the reconciler's passes over it."""

    def __init__(self, client: TestClient, context: ServiceContext, account: str, owner: dict, body: dict) -> None:
        self.client, self.context, self.owner = client, context, owner
        self.account, self.id = account, body["id"]
        self.url = f"{account}/services/{body['id']}"

    def reconcile(self) -> dict:
        reconcile_service(self.context, uuid.UUID(self.id))
        return self.show()

    def show(self) -> dict:
        return self.client.get(self.url, headers=self.owner).json()

    def operation(self) -> dict:
        operation_id = self.show()["operationId"]
        return self.client.get(f"{self.account}/operations/{operation_id}", headers=self.owner).json()

    def patch(self, **body: Any) -> dict:
        response = self.client.patch(self.url, json=body, headers=self.owner)
        assert response.status_code == 202, response.text
        return response.json()

    def logs(self) -> str:
        return self.client.get(f"{self.url}/logs", headers=self.owner).text


@pytest.fixture()
def service(
    client: TestClient,
    context: ServiceContext,
    account: str,
    owner: dict[str, str],
    images: list[str],
    fake: FakeKubeApi,
) -> Service:
    _attach(client, account, owner, fake.kubeconfig())
    return Service(client, context, account, owner, _deploy(client, account, owner, images[0]))


def _healthy(service: Service, fake: FakeKubeApi, replicas: int = 2) -> dict:
    shown = service.reconcile()  # applies
    fake.run_pods(replicas)
    shown = service.reconcile()
    assert shown["state"] == "Healthy", shown
    return shown


def _template(fake: FakeKubeApi) -> dict[str, str]:
    return fake.deployment()["spec"]["template"]["metadata"]["labels"]


def _resources(fake: FakeKubeApi) -> dict[str, str]:
    [container] = fake.deployment()["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == container["resources"]["limits"]
    return container["resources"]["limits"]


def test_a_service_deploys_scores_at_its_cluster_address_rolls_out_scales_and_is_deleted(
    service: Service, fake: FakeKubeApi, images: list[str]
) -> None:
    shown = service.reconcile()
    assert shown["state"] == "Transitioning" and shown["scoringUri"] is None
    deployment = fake.deployment()
    assert deployment["spec"]["replicas"] == 2
    assert [o["kind"] for o in fake.stored("networkpolicies") + fake.stored("services")] == ["NetworkPolicy", "Service"]
    assert fake.stored("secrets") == []  # no pull credential handed to the tenant's cluster

    names = fake.run_pods(2)
    fake.logs[names[0]] = ["2026-12-04T10:00:01Z Initialized PySpark session.", "2026-12-04T10:00:02Z ready"]
    shown = service.reconcile()
    assert shown["state"] == "Healthy" and shown["error"] is None
    [cluster_service] = fake.stored("services")
    address = f"{cluster_service['spec']['clusterIP']}:5001"
    # The gateway cannot reach the cluster: the Service's address as the cluster reports it.
    assert shown["scoringUri"] == f"http://{address}/score"
    assert shown["swaggerUri"] == f"http://{address}/swagger.json"
    assert shown["deploymentStatus"] == {"desiredReplicas": 2, "readyReplicas": 2}
    assert service.operation()["state"] == "Succeeded"
    assert f"g1 {names[0][:12]} ready" in service.logs()

    # An image swap: one re-apply, a new template; the Deployment rolls out, the old pods serve meanwhile.
    service.patch(imageId=images[1])
    shown = service.reconcile()
    assert (_template(fake)["org.mms.generation"], _template(fake)["org.mms.image"]) == ("2", images[1])
    assert shown["state"] == "Transitioning" and shown["scoringUri"] == f"http://{address}/score"
    fake.run_pods(1, replace=False)  # one new pod ready beside the two old ones (maxSurge 1)
    assert service.reconcile()["state"] == "Transitioning"
    fake.run_pods(2)
    shown = service.reconcile()
    assert (shown["state"], shown["imageId"]) == ("Healthy", images[1])
    assert service.operation()["state"] == "Succeeded"

    # A scale is the count alone.
    service.patch(numReplicas=3)
    service.reconcile()
    assert (fake.deployment()["spec"]["replicas"], _template(fake)["org.mms.generation"]) == (3, "2")
    fake.run_pods(3)
    assert service.reconcile()["state"] == "Healthy"

    assert service.client.delete(service.url, headers=service.owner).status_code == 202
    service.reconcile()
    assert service.client.get(service.url, headers=service.owner).status_code == 404
    assert fake.objects == {}  # nothing of it is left in the cluster
    deletes = [seen.path for seen in fake.seen if seen.method == "DELETE"]
    assert deletes and all("/namespaces/tenant-a/" in path for path in deletes)


def test_a_replica_in_crash_loop_back_off_fails_the_service_with_its_last_lines(
    service: Service, fake: FakeKubeApi
) -> None:
    service.reconcile()
    [pod] = fake.run_pods(1, ready=False, waiting="CrashLoopBackOff", restarts=3, exit_code=1)
    fake.previous_logs[pod] = TRACEBACK
    shown = service.reconcile()
    assert shown["state"] == "Failed"
    error = shown["error"]["message"]
    assert error.startswith(
        "a replica exited with code 1 3 times before it answered GET / (CrashLoopBackOff): "
        "ValueError: the model file is corrupt\nlast lines of its output:\n"
    )
    assert error.endswith("ValueError: the model file is corrupt")
    assert service.operation()["state"] == "Failed"
    # Nothing runs until the tenant changes it: the next pass takes its objects away; while its
    # pods still terminate it looks again soon, then only every FAILED_SECONDS.
    fake.collect_pods = False
    service.reconcile()
    assert _due_in(service) <= STEADY_SECONDS
    fake.collect_pods = True
    fake.objects = {key: obj for key, obj in fake.objects.items() if obj["kind"] != "Pod"}
    service.reconcile()
    assert fake.objects == {}
    assert service.show()["state"] == "Failed"
    assert _due_in(service) >= FAILED_SECONDS - 5


def _due_in(service: Service) -> float:
    """Seconds until the service's next pass is due."""
    with service.context.session_factory() as session:
        due_at = session.scalar(select(ServiceRow.due_at).where(ServiceRow.id == uuid.UUID(service.id)))
    assert due_at is not None
    return (due_at - utcnow()).total_seconds()


def test_a_failed_update_is_rolled_back_by_reapplying_the_old_template(
    service: Service, fake: FakeKubeApi, images: list[str]
) -> None:
    _healthy(service, fake)
    served = _resources(fake)
    assert served == {"cpu": "100m", "memory": "512Mi"}
    service.patch(imageId=images[1], containerResourceRequirements={"cpu": 1, "memoryInGB": 2})
    service.reconcile()
    assert _resources(fake) == {"cpu": "1000m", "memory": "2048Mi"}
    [pod] = fake.run_pods(1, ready=False, waiting="CrashLoopBackOff", restarts=3, exit_code=1, replace=False)
    fake.previous_logs[pod] = TRACEBACK
    shown = service.reconcile()
    assert (shown["state"], shown["imageId"]) == ("Healthy", images[0])  # the old pods served throughout
    assert shown["containerResourceRequirements"] == {"cpu": 0.1, "memoryInGB": 0.5}
    assert shown["error"]["message"].startswith("the update was rolled back: a replica exited with code 1")
    assert service.operation()["state"] == "Failed"
    service.reconcile()
    # The old template again, resources too: the Deployment goes back to the old pods, no new rollout.
    assert (_template(fake)["org.mms.generation"], _template(fake)["org.mms.image"]) == ("1", images[0])
    assert _resources(fake) == served
    # The next update is a generation of its own, never the failed one's number again.
    service.patch(imageId=images[1])
    service.reconcile()
    assert _template(fake)["org.mms.generation"] == "3"


def test_an_unreachable_cluster_makes_the_service_unhealthy_until_it_answers(
    service: Service, fake: FakeKubeApi
) -> None:
    _healthy(service, fake)
    fake.stop()
    shown = service.reconcile()
    assert shown["state"] == "Unhealthy"
    assert (
        shown["error"]["message"] == f"the kubernetes cluster at 127.0.0.1:{fake.port} did not answer (MaxRetryError)"
    )
    fake.start()
    assert service.reconcile()["state"] == "Healthy"


def test_without_the_kubernetes_extra_the_service_fails_saying_so(
    service: Service, fake: FakeKubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # `import kubernetes` fails as if not installed
    for name in [n for n in sys.modules if n.startswith(("kubernetes.", "workers.deploy.kubernetes"))]:
        monkeypatch.delitem(sys.modules, name)
    shown = service.reconcile()
    assert shown["state"] == "Failed"
    assert shown["error"]["message"] == (
        "the deploy workers cannot reach kubernetes targets: the kubernetes client is not installed on them "
        "(the operator installs the service's kubernetes extra: pip install 'mms[kubernetes]')"
    )
    assert fake.seen == []


def test_credentials_stay_out_of_errors_and_logs(
    client: TestClient,
    context: ServiceContext,
    account: str,
    owner: dict[str, str],
    images: list[str],
    fake: FakeKubeApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    stolen = "revoked-" + TOKEN
    fake.echo_credentials = True  # a hostile server says what it was sent
    _attach(client, account, owner, fake.kubeconfig(token=stolen))
    service = Service(client, context, account, owner, _deploy(client, account, owner, images[0]))
    shown = service.reconcile()
    assert shown["state"] == "Failed"
    assert shown["error"]["message"] == (
        f"the kubernetes cluster at 127.0.0.1:{fake.port} refused the kubeconfig's credentials (401): "
        "Unauthorized: Bearer ***"
    )
    assert stolen in (fake.seen[0].authorization or "")  # it was sent (and echoed)
    for text in (caplog.text, service.logs(), str(service.operation()), str(shown)):
        assert stolen not in text and PUSH_PASSWORD not in text


def test_on_the_embedded_image_store_a_kubernetes_service_fails_saying_why(service: Service, fake: FakeKubeApi) -> None:
    """The embedded store has no pull credential to hand a cluster, and the operator's own
    registry login is never handed to one."""
    service.context = ServiceContext.build(
        service.context.settings.model_copy(update={"registry": None}),
        engine=service.context.engine,
        session_factory=service.context.session_factory,
        read_session_factory=service.context.read_session_factory,
    )
    shown = service.reconcile()
    assert shown["state"] == "Failed"
    assert "the embedded image store cannot hand a cluster a pull credential" in shown["error"]["message"]
    assert "MMS_REGISTRY" in shown["error"]["message"]
    assert fake.seen == []


def _relabel_serving_pods(fake: FakeKubeApi, image_id: str) -> None:
    """What a hostile cluster may report: the serving generation's pods name an image of its choosing."""
    with fake._lock:
        for (resource, _, _), obj in fake.objects.items():
            if resource == "pods" and obj["metadata"]["labels"]["org.mms.generation"] == "1":
                obj["metadata"]["labels"]["org.mms.image"] = image_id


def _failed_update(service: Service, fake: FakeKubeApi, new_image: str) -> None:
    _healthy(service, fake)
    service.patch(imageId=new_image)
    service.reconcile()  # the new template
    [pod] = fake.run_pods(1, ready=False, waiting="CrashLoopBackOff", restarts=3, exit_code=1, replace=False)
    fake.previous_logs[pod] = TRACEBACK


def test_a_roll_back_never_takes_an_image_of_another_account_from_the_clusters_labels(
    service: Service, fake: FakeKubeApi, images: list[str], client: TestClient, db: Session, owner: dict[str, str]
) -> None:
    """The pods' org.mms.image label is the cluster's to report, and a tenant chose the cluster:
    a roll back to the image it names would point the service at another account's image (shown
    in its GET, deployed by the next pass, and holding that image and account from deletion)."""
    other = new_account(client, owner)
    model_id = client.post(f"{other}/models", json=model_body(), headers=owner).json()["id"]
    manifest_id = client.post(f"{other}/manifests", json=seed_manifest(model_id), headers=owner).json()["id"]
    victim = built_image(client, db, other, owner, manifest_id)
    _failed_update(service, fake, images[1])
    _relabel_serving_pods(fake, victim)
    shown = service.reconcile()
    assert shown["error"]["message"].startswith("the update was rolled back: a replica exited with code 1")
    assert shown["imageId"] in images and shown["imageId"] != victim
    assert victim not in str(fake.deployment())  # the next pass deploys none of the other account's
    service.reconcile()
    assert victim not in str(fake.deployment())
    assert client.delete(f"{other}/images/{victim}", headers=owner).status_code in (200, 202, 204)


def test_a_new_cluster_address_of_a_healthy_service_is_an_event(
    service: Service, fake: FakeKubeApi, db: Session
) -> None:
    _healthy(service, fake)
    [cluster_service] = fake.stored("services")
    key = ("services", "tenant-a", cluster_service["metadata"]["name"])
    fake.objects[key]["spec"]["clusterIP"] = "10.96.7.7"  # deleted and made again by someone: a new address
    shown = service.reconcile()
    assert shown["scoringUri"] == "http://10.96.7.7:5001/score"
    last = db.scalars(
        select(Event.payload).where(Event.subject_id == uuid.UUID(service.id)).order_by(Event.id.desc()).limit(1)
    ).one()
    assert json.loads(last)["service"]["scoringUri"] == shown["scoringUri"]


def test_a_quiet_replicas_lines_trimmed_behind_a_chatty_ones_are_not_copied_again(
    service: Service, fake: FakeKubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stored log keeps the newest lines of the service; a pass copies what each replica
    printed after its newest stored line. A quiet replica whose lines were all trimmed away
    must not have its tail copied again (it would show once more, after newer lines)."""
    monkeypatch.setattr(reconciler, "KEPT_LOG_LINES", 10)
    service.reconcile()
    quiet, chatty = fake.run_pods(2)
    fake.logs[quiet] = ["2026-12-04T10:00:01Z quiet: loaded", "2026-12-04T10:00:02Z quiet: ready"]
    fake.logs[chatty] = ["2026-12-04T10:00:01Z chatty: loaded"]
    service.reconcile()
    fake.logs[chatty] += [f"2026-12-04T10:01:{n:02d}Z chatty: request {n}" for n in range(20)]
    service.reconcile()  # the quiet replica's lines are trimmed
    assert "chatty: request 19" in service.logs() and "quiet: loaded" not in service.logs()
    shown = service.logs()
    service.reconcile()  # nobody printed anything since
    assert service.logs() == shown
    assert shown.count("quiet: ready") <= 1


def _writes(fake: FakeKubeApi) -> list[tuple[str, str]]:
    """(method, resource) of every request since the last clear that was not a read."""
    return [(seen.method, seen.path.split("/")[-2]) for seen in fake.seen if seen.method != "GET"]


def test_a_settled_service_is_only_read_until_an_object_is_missing_drifted_or_changed(
    service: Service, fake: FakeKubeApi, images: list[str]
) -> None:
    _healthy(service, fake)
    fake.seen.clear()
    for _ in range(3):
        assert service.reconcile()["state"] == "Healthy"
    assert _writes(fake) == []  # three passes, nothing applied or deleted
    reads = len(fake.seen)
    fake.seen.clear()
    service.reconcile()
    assert len(fake.seen) == reads / 3  # each pass the same few reads

    # Deleted underneath: that object alone is applied again.
    [policy] = fake.stored("networkpolicies")
    del fake.objects[("networkpolicies", "tenant-a", policy["metadata"]["name"])]
    fake.seen.clear()
    service.reconcile()
    assert _writes(fake) == [("PATCH", "networkpolicies")]
    assert fake.stored("networkpolicies")[0]["spec"] == policy["spec"]

    # Its spec changed by someone else (kubectl edit): applied back.
    def swap_image(deployment: dict) -> None:
        deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "elsewhere.example/evil@sha256:" + "e" * 64

    image = fake.deployment()["spec"]["template"]["spec"]["containers"][0]["image"]
    fake.edit("deployments", swap_image)
    fake.seen.clear()
    service.reconcile()
    assert _writes(fake) == [("PATCH", "deployments")]
    assert fake.deployment()["spec"]["template"]["spec"]["containers"][0]["image"] == image
    # ... but not what the cluster's own controllers write: a count through the scale subresource.
    fake.edit("deployments", lambda d: None, manager="kube-controller-manager", subresource="scale")
    fake.edit("deployments", lambda d: None, manager="kube-controller-manager", fields=("f:metadata",))
    fake.seen.clear()
    service.reconcile()
    assert _writes(fake) == []

    # A change of the tenant's: applied on the next pass.
    service.patch(numReplicas=3)
    fake.seen.clear()
    service.reconcile()
    assert _writes(fake) == [("PATCH", "deployments")]
    assert fake.deployment()["spec"]["replicas"] == 3
    fake.run_pods(3)
    assert service.reconcile()["state"] == "Healthy"
    service.patch(imageId=images[1])
    fake.seen.clear()
    service.reconcile()
    assert _writes(fake) == [("PATCH", "deployments")]
    assert _template(fake)["org.mms.image"] == images[1]


@pytest.mark.parametrize("bound_to", ["aks", "other"])
def test_a_cluster_the_operator_allows_for_its_compute_alone_is_reached_by_that_computes_passes(
    client: TestClient,
    app_context: ServiceContext,
    account: str,
    owner: dict[str, str],
    images: list[str],
    fake: FakeKubeApi,
    bound_to: str,
) -> None:
    """The pass finds the compute's path from its rows and reaches the cluster's private server
    only when the operator allowed it for that compute (here, for nothing else)."""
    path = f"{account.removeprefix('/api')}/computes/{bound_to}"
    settings = app_context.settings.model_copy(
        update={"fetch_allow_hosts": [], "compute_allow_hosts": {path: [f"127.0.0.1:{fake.port}"]}}
    )
    context = ServiceContext.build(
        settings,
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )
    _attach(client, account, owner, fake.kubeconfig())
    service = Service(client, context, account, owner, _deploy(client, account, owner, images[0]))
    shown = service.reconcile()
    if bound_to == "aks":
        assert fake.deployment()["spec"]["replicas"] == 2, shown
    else:
        assert shown["state"] in ("Unhealthy", "Failed") and "MMS_COMPUTE_ALLOW_HOSTS" in shown["error"]["message"]
        assert fake.seen == []  # never connected to
