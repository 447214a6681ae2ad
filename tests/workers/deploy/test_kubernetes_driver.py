"""The kubernetes driver (workers/deploy/kubernetes_driver.py) against a fake API server on
loopback (tests/workers/deploy/fake_kube_api.py): no cluster can run here, so this target is
tested against that fake only, never a live cluster. The fake checks every request's shape and
validates every applied object against the 1.37 schema, strictly; each test asserts it saw no
fault. Here the driver alone; the reconciler's passes through it are
test_kubernetes_reconcile.py."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.deployments.reconciler import Spec
from app.deployments.states import ServiceState
from app.orm.base import utcnow
from tests.workers.deploy.fake_kube_api import HOST_NAME, FakeKubeApi, fake_kube_api
from workers.deploy.kubeconfig import KubeconfigPolicy
from workers.deploy.kubernetes_driver import KubernetesDriver
from workers.deploy.local import EngineUnreachable, TargetRefused
from workers.fetcher import FetchPolicy

TOKEN = "fake-cluster-token-never-in-a-log"
DIGEST = "sha256:" + "e" * 64
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


def _policy(fake: FakeKubeApi, *hosts: str) -> KubeconfigPolicy:
    return KubeconfigPolicy(fetch=FetchPolicy(allow_hosts=frozenset(hosts or (f"127.0.0.1:{fake.port}",))))


def _driver(fake: FakeKubeApi, **changes: Any) -> KubernetesDriver:
    kubeconfig = changes.pop("kubeconfig", None) or fake.kubeconfig()
    return KubernetesDriver(kubeconfig, namespace="tenant-a", policy=changes.pop("policy", None) or _policy(fake))


def _spec(**changes: Any) -> Spec:
    now = utcnow()
    fields: dict[str, Any] = {
        "id": uuid.UUID("0f8e4c2a-1b2c-4d5e-8f90-123456789abc"),
        "account_id": uuid.uuid4(),
        "state": ServiceState.TRANSITIONING,
        "compute_type": "kubernetes",
        "compute_name": "aks",
        "compute_attached": True,
        "image_id": uuid.uuid4(),
        "image_location": f"registry.example:5000/acct/housing@{DIGEST}",
        "image_digest": DIGEST,
        "generation": 1,
        "traffic_generation": None,
        "replicas": 2,
        "cpu": 0.5,
        "memory_gb": 1.0,
        "scoring_timeout_ms": 60000,
        "revision": 1,
        "changed_at": now - timedelta(seconds=1),
        "switched_at": None,
        "name": "housing",
        "auth_enabled": False,
    }
    return Spec(**(fields | changes))


def _applies(fake: FakeKubeApi) -> list[str]:
    return [seen.path.rsplit("/", 2)[-2] for seen in fake.seen if seen.method == "PATCH"]


def test_apply_sends_each_object_by_server_side_apply_and_changes_nothing_the_second_time(fake: FakeKubeApi) -> None:
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
        assert _applies(fake) == ["networkpolicies", "deployments", "services"]  # no pull Secret, no HPA
        deployment = fake.deployment()
        assert deployment["metadata"]["name"] == "mms-housing-0f8e4c2a"
        assert deployment["spec"]["replicas"] == 2
        template = deployment["spec"]["template"]
        assert template["metadata"]["labels"]["org.mms.generation"] == "1"
        assert template["metadata"]["labels"]["org.mms.image"] == str(spec.image_id)
        assert template["spec"]["containers"][0]["image"] == spec.image_location
        assert "imagePullSecrets" not in template["spec"]  # the cluster pulls with its own access
        driver.apply(spec)
    assert fake.deployment()["metadata"]["generation"] == 1  # the same spec: no rollout
    for seen in fake.seen:
        assert seen.authorization == f"Bearer {TOKEN}"
        assert "/namespaces/tenant-a/" in seen.path


def test_an_image_swap_is_a_new_template_and_a_scale_only_a_count(fake: FakeKubeApi) -> None:
    with _driver(fake) as driver:
        driver.apply(_spec())
        driver.apply(_spec(replicas=4))
        scaled = fake.deployment()
        assert (scaled["spec"]["replicas"], scaled["spec"]["template"]["metadata"]["labels"]["org.mms.generation"]) == (
            4,
            "1",
        )
        driver.apply(_spec(replicas=4, generation=2, image_location=f"registry.example:5000/acct/housing2@{DIGEST}"))
    swapped = fake.deployment()
    assert swapped["spec"]["template"]["metadata"]["labels"]["org.mms.generation"] == "2"
    assert swapped["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        "registry.example:5000/acct/housing2@"
    )
    # The Deployment's own rolling update does the rollout: a new ready replica before an old one goes.
    assert swapped["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_an_autoscaled_service_leaves_the_count_to_its_hpa(fake: FakeKubeApi) -> None:
    scaler = {"autoscaleEnabled": True, "minReplicas": 2, "maxReplicas": 5, "targetUtilization": 60}
    spec = _spec(autoscaler=scaler)
    with _driver(fake) as driver:
        driver.apply(spec)
        [hpa] = fake.stored("horizontalpodautoscalers")
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
        applied = [s for s in fake.seen if s.method == "PATCH" and "/deployments/" in s.path][-1]
        assert b'"replicas"' not in applied.body  # the HPA's to set: applying it would undo the HPA
        fake.objects[("deployments", "tenant-a", "mms-housing-0f8e4c2a")]["spec"]["replicas"] = 4  # the HPA scaled
        driver.apply(spec)
        assert fake.deployment()["spec"]["replicas"] == 4
        driver.observe(spec)
        assert driver.scaled_to == 4
        driver.apply(_spec(replicas=3))  # the autoscaler turned off: its HPA goes
    assert fake.stored("horizontalpodautoscalers") == []
    assert fake.deployment()["spec"]["replicas"] == 3


def test_ready_pods_are_ready_replicas_and_the_service_address_is_the_clusters(fake: FakeKubeApi) -> None:
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
        assert driver.observe(spec) == ([], None)
        names = fake.run_pods(2)
        replicas, failure = driver.observe(spec)
        assert failure is None
        assert sorted(r.id for r in replicas) == sorted(names)
        assert all(r.ready and r.alive and r.generation == 1 and r.address is None for r in replicas)
        assert {r.image_id for r in replicas} == {str(spec.image_id)}
        [service] = fake.stored("services")
        assert driver.endpoint(spec) == f"{service['spec']['clusterIP']}:5001"
        fake.logs[names[0]] = ["2026-12-04T10:00:01.5Z ready", "2026-12-04T10:00:02Z scored 1 row"]
        lines = driver.read_logs(spec, replicas)
        assert [(line.replica_id, line.text) for line in lines] == [(names[0], "ready"), (names[0], "scored 1 row")]
        marked = _spec(log_marks={names[0]: lines[0].logged_ns})
        assert [line.text for line in driver.read_logs(marked, replicas)] == ["scored 1 row"]


def test_a_replica_in_crash_loop_back_off_fails_the_generation_with_its_last_lines(fake: FakeKubeApi) -> None:
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
        [pod] = fake.run_pods(1, ready=False, waiting="CrashLoopBackOff", restarts=3, exit_code=1)
        fake.previous_logs[pod] = TRACEBACK
        _, failure = driver.observe(spec)
    assert failure is not None
    assert failure.reason == (
        "a replica exited with code 1 3 times before it answered GET / (CrashLoopBackOff): "
        "ValueError: the model file is corrupt"
    )
    assert failure.logs.splitlines() == [line.partition(" ")[2] for line in TRACEBACK]
    assert any("/log" in s.path and s.query.get("previous") == ["True"] for s in fake.seen)


def test_an_image_the_cluster_cannot_pull_or_a_stalled_rollout_fails_the_generation(fake: FakeKubeApi) -> None:
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
        fake.run_pods(1, ready=False, waiting="ImagePullBackOff")
        _, failure = driver.observe(spec)
        assert failure is not None and failure.reason.startswith(
            "the cluster cannot start a replica (ImagePullBackOff)"
        )
        fake.run_pods(1, ready=False)  # pulled, but never ready
        stalled = {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": 'ReplicaSet "mms-housing-0f8e4c2a-5d9" has timed out progressing.',
        }
        fake.set_status(conditions=[stalled])
        _, failure = driver.observe(spec)
        assert failure is not None
        assert failure.reason == (
            "the Deployment made no progress within its deadline (ProgressDeadlineExceeded): "
            'ReplicaSet "mms-housing-0f8e4c2a-5d9" has timed out progressing.'
        )
        # The condition of an older template says nothing about the generation asked for now.
        assert driver.observe(_spec(generation=2))[1] is None


def test_remove_all_takes_every_object_of_the_service_in_its_namespace_and_nothing_else(fake: FakeKubeApi) -> None:
    spec = _spec(autoscaler={"autoscaleEnabled": True, "minReplicas": 1, "maxReplicas": 3})
    other = _spec(id=uuid.uuid4(), name="other")
    with _driver(fake) as driver:
        driver.apply(other)
        driver.apply(spec)
        kept = {k: v for k, v in fake.objects.items() if v["metadata"]["labels"]["org.mms.service"] == str(other.id)}
        elsewhere = dict(fake.objects[("deployments", "tenant-a", "mms-housing-0f8e4c2a")])
        fake.objects[("deployments", "tenant-b", "mms-housing-0f8e4c2a")] = elsewhere  # another namespace's
        assert driver.remove_all(spec.id) is True
    assert {k: v for k, v in fake.objects.items() if k[1] == "tenant-a"} == kept
    assert ("deployments", "tenant-b", "mms-housing-0f8e4c2a") in fake.objects
    deletes = [s.path for s in fake.seen if s.method == "DELETE"]
    assert deletes and all("/namespaces/tenant-a/" in path for path in deletes)
    assert deletes[-1].endswith("/networkpolicies/mms-housing-0f8e4c2a")  # the policy last


def test_a_delete_waits_for_the_pods_before_it_drops_their_network_policy(fake: FakeKubeApi) -> None:
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
        [pod] = fake.run_pods(1)
        fake.collect_pods = False  # its pod still terminates after the Deployment went
        assert driver.remove_all(spec.id) is False
        assert fake.stored("deployments") == [] and fake.stored("networkpolicies") != []
        del fake.objects[("pods", "tenant-a", pod)]  # gone now
        assert driver.remove_all(spec.id) is True
    assert fake.objects == {}


def test_a_cluster_that_does_not_answer_is_unreachable(fake: FakeKubeApi) -> None:
    fake.stop()
    with _driver(fake) as driver, pytest.raises(EngineUnreachable) as raised:
        driver.apply(_spec())
    assert str(raised.value) == f"the kubernetes cluster at 127.0.0.1:{fake.port} did not answer (MaxRetryError)"


def test_a_server_on_loopback_is_refused_unless_the_operator_allows_it(fake: FakeKubeApi) -> None:
    with pytest.raises(TargetRefused) as raised:
        KubernetesDriver(fake.kubeconfig(), namespace="tenant-a", policy=KubeconfigPolicy())
    assert "clusters[0].cluster.server" in str(raised.value) and "a loopback address" in str(raised.value)
    assert fake.seen == []  # refused before any connection


def test_a_server_in_the_operators_service_networks_is_refused_even_if_allowed(fake: FakeKubeApi) -> None:
    """Where other services' replicas answer, as for a swarm manager: whatever the allow-lists say."""
    allowed = _policy(fake)
    with pytest.raises(TargetRefused, match="MMS_SERVICE_SUBNET_POOL"):
        KubernetesDriver(fake.kubeconfig(), namespace="tenant-a", policy=replace(allowed, service_pool="127.0.0.0/16"))
    assert fake.seen == []
    with KubernetesDriver(
        fake.kubeconfig(), namespace="tenant-a", policy=replace(allowed, service_pool="10.213.0.0/16")
    ):
        pass  # elsewhere: allowed


def test_the_connection_goes_to_the_address_checked_with_the_name_for_tls(fake: FakeKubeApi) -> None:
    """The server is named: resolved once (here by a resolver only the driver has), checked, and
    connected to at that address; the certificate is checked for the name."""
    resolved: list[str] = []

    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        resolved.append(host)
        assert host == HOST_NAME
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    kubeconfig = fake.kubeconfig(server=f"https://{HOST_NAME}:{fake.port}")
    driver = KubernetesDriver(
        kubeconfig, namespace="tenant-a", policy=_policy(fake, f"{HOST_NAME}:{fake.port}"), resolver=resolver
    )
    with driver:
        driver.apply(_spec())  # HOST_NAME resolves nowhere else: this reached the checked address
    assert resolved and fake.deployment()["metadata"]["name"] == "mms-housing-0f8e4c2a"


@pytest.mark.parametrize("answered", [0, 1], ids=["first lookup", "second lookup"])
@pytest.mark.parametrize("answer", ["fails", "hangs"])
def test_a_server_name_that_does_not_resolve_now_is_unreachable_not_refused(
    fake: FakeKubeApi, answer: str, answered: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether the resolver fails or does not answer (the fetcher gives up on it at its
    bound, well inside the pass's deadline), the name may resolve later: Unhealthy, tried
    again, not Failed; also when only the second of the pass's two lookups of it does so
    (from the review)."""
    import threading
    import time

    from workers import fetcher

    monkeypatch.setattr(fetcher, "RESOLVE_SECONDS", 0.3)
    release = threading.Event()
    lookups: list[str] = []

    def resolver(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        lookups.append(host)
        if len(lookups) > answered:
            if answer == "fails":
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            release.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    kubeconfig = fake.kubeconfig(server=f"https://{HOST_NAME}:{fake.port}")
    started = time.monotonic()
    try:
        with pytest.raises(EngineUnreachable, match="does not resolve"):
            KubernetesDriver(
                kubeconfig, namespace="tenant-a", policy=_policy(fake, f"{HOST_NAME}:{fake.port}"), resolver=resolver
            )
        assert time.monotonic() - started < 3
    finally:
        release.set()
    assert fake.seen == []


@contextmanager
def _elsewhere() -> Iterator[tuple[int, list[object]]]:
    """A listener that only notes who connects (as a proxy or a redirect's target would be)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    connected: list[object] = []

    def watch() -> None:
        try:
            connection, _ = listener.accept()
            connected.append(connection)
            connection.close()
        except OSError:
            pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield listener.getsockname()[1], connected
    finally:
        watcher.join()
        listener.close()


def test_a_redirect_is_not_followed(fake: FakeKubeApi) -> None:
    with _elsewhere() as (port, connected):
        fake.redirect_to = f"http://127.0.0.1:{port}/steal"
        with _driver(fake) as driver, pytest.raises(EngineUnreachable) as raised:
            driver.apply(_spec())
    assert "answered 302" in str(raised.value)
    assert connected == []


def test_the_environments_proxy_is_not_used(fake: FakeKubeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client reads HTTPS_PROXY and the like: the tenant's token must not go through it."""
    with _elsewhere() as (port, connected):
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with _driver(fake) as driver:
            driver.apply(_spec())
    assert connected == []
    assert fake.deployment()["metadata"]["name"] == "mms-housing-0f8e4c2a"


def test_the_clusters_refusals_never_carry_the_token(fake: FakeKubeApi, caplog: pytest.LogCaptureFixture) -> None:
    """A hostile server echoes the credential it was sent: the error cuts it out."""
    caplog.set_level("DEBUG")
    stolen = "stolen-" + TOKEN
    fake.echo_credentials = True
    with _driver(fake, kubeconfig=fake.kubeconfig(token=stolen)) as driver, pytest.raises(TargetRefused) as raised:
        driver.apply(_spec())
    message = str(raised.value)
    assert message == (
        f"the kubernetes cluster at 127.0.0.1:{fake.port} refused the kubeconfig's credentials (401): "
        "Unauthorized: Bearer ***"
    )
    assert stolen in fake.seen[0].authorization  # it was sent, and echoed
    assert stolen not in caplog.text
