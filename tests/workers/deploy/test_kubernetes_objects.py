"""The kubernetes target's objects (workers/deploy/kubernetes.py), checked strictly against the
Kubernetes 1.37 OpenAPI schema (an unknown field fails, as a wrong type does), their containment,
and the kubeconfig check at connect time (workers/deploy/kubeconfig.py: the service's policy plus
each server's address). No cluster: nothing here connects."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from app.config import Settings
from tests.factories import KUBE_TOKEN, kubeconfig_text
from workers.deploy.kubeconfig import (
    KubeconfigPolicy,
    KubeconfigRefused,
    check_kubeconfig,
    kubeconfig_policy,
)
from workers.deploy.kubernetes import (
    Autoscaler,
    KubernetesObjects,
    PullCredential,
    ServiceDescription,
    ServiceSpecError,
    build_objects,
)
from workers.fetcher import FetchPolicy

SCHEMA_VERSION = "1.37"
SERVICE_ID = "0f8e4c2a-1b2c-4d5e-8f90-123456789abc"
IMAGE = "registry.example:5000/acct1/housing@sha256:" + "ab" * 32
PULL_PASSWORD = "pull-token-that-must-stay-in-the-secret"


def _description(**changes: Any) -> ServiceDescription:
    fields: dict[str, Any] = {
        "name": "housing",
        "service_id": SERVICE_ID,
        "account_id": "acct1",
        "image": IMAGE,
        "pull_credential": PullCredential("registry.example:5000", "puller", PULL_PASSWORD),
        "cpu": 0.5,
        "memory_gb": 1.5,
        "replicas": 2,
        "namespace": "tenant-a",
    }
    fields.update(changes)
    return ServiceDescription(**fields)


FIXED = _description()
AUTOSCALED = _description(replicas=None, autoscaler=Autoscaler(min_replicas=2, max_replicas=5, target_utilization=70))


def _body(obj: object) -> dict[str, Any]:
    return ApiClient().sanitize_for_serialization(obj)


def _validate(body: dict[str, Any]) -> None:
    kubernetes_validate.validate(body, SCHEMA_VERSION, strict=True)


def _pod(objects: KubernetesObjects) -> dict[str, Any]:
    return _body(objects.deployment)["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("description", "kinds"),
    [
        pytest.param(FIXED, ["Secret", "NetworkPolicy", "Deployment", "Service"], id="fixed-replicas"),
        pytest.param(
            AUTOSCALED,
            ["Secret", "NetworkPolicy", "Deployment", "Service", "HorizontalPodAutoscaler"],
            id="autoscaled",
        ),
    ],
)
def test_every_object_passes_the_strict_schema(description: ServiceDescription, kinds: list[str]) -> None:
    bodies = [_body(obj) for obj in build_objects(description).in_apply_order()]
    assert [body["kind"] for body in bodies] == kinds
    for body in bodies:
        _validate(body)  # raises kubernetes_validate.ValidationError on any fault


@pytest.mark.parametrize(
    ("kind", "breakage", "message"),
    [
        ("Deployment", lambda b: b["spec"].__setitem__("replicas", "two"), "'two' is not of type 'integer'"),
        (
            "Deployment",
            lambda b: b["spec"]["template"]["spec"]["containers"][0].__setitem__(
                "readinesProbe", b["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe")
            ),
            "readinesProbe",
        ),
        ("Deployment", lambda b: b["spec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required"),
        ("HorizontalPodAutoscaler", lambda b: b["spec"].pop("maxReplicas"), "'maxReplicas' is a required"),
        ("NetworkPolicy", lambda b: b["spec"].__setitem__("egress", {"to": []}), "is not of type 'array'"),
    ],
    ids=["wrong-type", "misspelt-field", "missing-required", "hpa-missing-max", "policy-egress-not-a-list"],
)
def test_a_broken_object_fails_the_schema(kind: str, breakage: Any, message: str) -> None:
    """The check can fail: each object passes as built and fails once broken."""
    body = next(_body(o) for o in build_objects(AUTOSCALED).in_apply_order() if _body(o)["kind"] == kind)
    _validate(body)
    broken = copy.deepcopy(body)
    breakage(broken)
    with pytest.raises(kubernetes_validate.ValidationError) as raised:
        _validate(broken)
    assert message in str(raised.value)


def test_the_replicas_are_contained() -> None:
    pod = _pod(build_objects(FIXED))
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert (pod["hostNetwork"], pod["hostPID"], pod["hostIPC"]) == (False, False, False)
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10002,
        "runAsGroup": 10002,
        "fsGroup": 10002,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10002,
        "runAsGroup": 10002,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    # The only writable places are memory-backed and bounded: /tmp and the images' $HOME.
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {"/tmp": "tmp", "/home/scoring": "home"}
    assert pod["volumes"] == [
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {"name": "home", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]
    # No key, no token in the container: only the port.
    assert container["env"] == [{"name": "PORT", "value": "5001"}]
    assert pod["imagePullSecrets"] == [{"name": "mms-housing-0f8e4c2a-pull"}]
    assert container["image"] == IMAGE


def test_requests_equal_limits() -> None:
    [container] = _pod(build_objects(FIXED))["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1536Mi"},
        "limits": {"cpu": "500m", "memory": "1536Mi"},
    }


def test_probes_are_the_smoke_tests_get_on_the_scoring_port() -> None:
    [container] = _pod(build_objects(FIXED))["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/", "port": 5001, "scheme": "HTTP"}
    # init() gets the smoke test's two minutes before liveness counts.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 120
    assert container["ports"] == [{"name": "http", "containerPort": 5001, "protocol": "TCP"}]


def test_every_object_is_labelled_with_the_service_id() -> None:
    objects = build_objects(AUTOSCALED)
    for obj in objects.in_apply_order():
        metadata = _body(obj)["metadata"]
        assert metadata["labels"]["org.mms.service"] == SERVICE_ID, metadata["name"]
        assert metadata["labels"]["org.mms.account"] == "acct1"
        assert metadata["namespace"] == "tenant-a"
    deployment = _body(objects.deployment)["spec"]
    assert deployment["selector"] == {"matchLabels": {"org.mms.service": SERVICE_ID}}
    assert deployment["template"]["metadata"]["labels"]["org.mms.service"] == SERVICE_ID
    assert deployment["template"]["metadata"]["labels"]["org.mms.generation"] == "1"
    assert _body(objects.service)["spec"]["selector"] == {"org.mms.service": SERVICE_ID}


def test_a_rolling_update_never_drops_a_ready_replica() -> None:
    strategy = _body(build_objects(FIXED).deployment)["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_the_network_policy_lets_only_the_gateway_in_and_nothing_out() -> None:
    spec = _body(build_objects(FIXED).network_policy)["spec"]
    assert spec["podSelector"] == {"matchLabels": {"org.mms.service": SERVICE_ID}}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["egress"] == []  # Egress listed with no rule: every connection out is denied
    [rule] = spec["ingress"]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mms"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "mms-gateway"}},
        }
    ]
    assert rule["ports"] == [{"port": 5001, "protocol": "TCP"}]


def test_the_service_is_cluster_internal() -> None:
    spec = _body(build_objects(FIXED).service)["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "http", "port": 5001, "targetPort": 5001, "protocol": "TCP"}]


def test_fixed_replicas_have_no_autoscaler() -> None:
    objects = build_objects(FIXED)
    assert objects.autoscaler is None
    assert _body(objects.deployment)["spec"]["replicas"] == 2


def test_the_autoscaler_scales_the_deployment_on_cpu() -> None:
    objects = build_objects(AUTOSCALED)
    # No count: the driver applies these objects on every pass, and a count would undo the HPA's.
    assert "replicas" not in _body(objects.deployment)["spec"]
    hpa = _body(objects.autoscaler)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "mms-housing-0f8e4c2a",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
    ]


def test_the_pull_secret_is_a_login_to_the_registry_only() -> None:
    objects = build_objects(FIXED)
    secret = _body(objects.secret)
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    config = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))
    login = config["auths"]["registry.example:5000"]
    assert (login["username"], login["password"]) == ("puller", PULL_PASSWORD)
    assert base64.b64decode(login["auth"]).decode() == f"puller:{PULL_PASSWORD}"
    # The credential is in the Secret alone, and not in its repr (logs).
    others = [_body(o) for o in objects.in_apply_order() if o is not objects.secret]
    assert PULL_PASSWORD not in json.dumps(others)
    assert PULL_PASSWORD not in repr(FIXED)
    # Nor, base64 inside base64, in the repr of the objects a reconciler would log as it applies them.
    assert secret["data"][".dockerconfigjson"] not in repr(objects)


def test_without_a_pull_credential_there_is_no_secret_and_the_cluster_pulls_on_its_own() -> None:
    objects = build_objects(_description(pull_credential=None))
    assert objects.secret is None
    assert [_body(o)["kind"] for o in objects.in_apply_order()] == ["NetworkPolicy", "Deployment", "Service"]
    assert "imagePullSecrets" not in _pod(objects)
    for obj in objects.in_apply_order():
        _validate(_body(obj))


def test_the_pods_carry_their_image_id_when_given() -> None:
    image_id = "5b0c1f9e-2a7d-4c3b-9e8f-0a1b2c3d4e5f"
    labels = _body(build_objects(_description(image_id=image_id)).deployment)["spec"]["template"]["metadata"]["labels"]
    assert labels["org.mms.image"] == image_id
    assert "org.mms.image" not in _body(build_objects(FIXED).deployment)["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"autoscaler": Autoscaler(1, 3, 50)}, "deploymentConfig.numReplicas"),
        ({"replicas": 0}, "deploymentConfig.numReplicas"),
        ({"replicas": None, "autoscaler": Autoscaler(3, 2, 50)}, "deploymentConfig.autoScaler.maxReplicas"),
        ({"replicas": None, "autoscaler": Autoscaler(0, 2, 50)}, "deploymentConfig.autoScaler.minReplicas"),
        ({"replicas": None, "autoscaler": Autoscaler(1, 2, 0)}, "deploymentConfig.autoScaler.targetUtilization"),
        ({"image": "registry.example:5000/acct1/housing:latest"}, "imageLocation"),
        ({"cpu": 0}, "deploymentConfig.containerResourceRequirements.cpu"),
        ({"memory_gb": 0.1}, "deploymentConfig.containerResourceRequirements.memoryInGB"),
        ({"name": "Housing_1"}, "name"),
        ({"image_id": "not a label value"}, "imageId"),
    ],
)
def test_a_description_the_target_cannot_run_is_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ServiceSpecError) as raised:
        build_objects(_description(**changes))
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")


# --- the kubeconfig policy at connect time ----------------------------------------------------
# The policy itself (fields, https, insecure TLS, the document's shape) is app/deployments/kubeconfig.py's,
# tested in tests/deployments/test_kubeconfig.py; here, what the worker adds: each server's address
# through the fetch policy, and the settings reaching it.


def _refused(text: str, policy: KubeconfigPolicy | None = None) -> KubeconfigRefused:
    with pytest.raises(KubeconfigRefused) as raised:
        check_kubeconfig(text, policy or KubeconfigPolicy())
    assert KUBE_TOKEN not in str(raised.value)
    return raised.value


def test_the_worker_applies_the_service_policy() -> None:
    assert check_kubeconfig(kubeconfig_text()).token == KUBE_TOKEN
    error = _refused(kubeconfig_text(user="exec:\n  command: /bin/sh\n  apiVersion: x\n"))
    assert error.field == "users[0].user.exec"
    assert "runs a command on the worker" in str(error)


def test_insecure_skip_tls_verify_passes_only_with_the_setting() -> None:
    text = kubeconfig_text(cluster="insecure-skip-tls-verify: true\n")
    refused = _refused(text, kubeconfig_policy(Settings(), compute_path=None))
    assert refused.field == "clusters[0].cluster.insecure-skip-tls-verify"
    allowing = kubeconfig_policy(Settings(kubernetes_allow_insecure_tls=True), compute_path=None)
    assert check_kubeconfig(text, allowing).insecure_skip_tls_verify is True


@pytest.mark.parametrize(
    ("server", "kind"),
    [
        ("https://127.0.0.1:6443", "a loopback address"),
        ("https://localhost:6443", "a loopback address"),  # a name: resolved, then judged
        ("https://[::1]:6443", "a loopback address"),
        ("https://169.254.169.254", "a link-local address"),
        ("https://10.0.0.1:6443", "a private address"),
        ("https://192.168.49.2:8443", "a private address"),
    ],
)
def test_a_server_on_a_non_public_address_is_refused(server: str, kind: str) -> None:
    error = _refused(kubeconfig_text(server=server))
    assert error.field == "clusters[0].cluster.server"
    assert kind in str(error)
    assert "MMS_FETCH_ALLOW_HOSTS" in str(error)


def test_a_server_outside_the_current_context_is_judged_too() -> None:
    text = kubeconfig_text().replace("users:", "- name: other\n  cluster:\n    server: https://10.0.0.1:6443\nusers:")
    assert _refused(text).field == "clusters[1].cluster.server"


def test_a_private_server_the_operator_allows_is_accepted() -> None:
    text = kubeconfig_text(server="https://10.0.0.1:6443")
    policy = KubeconfigPolicy(fetch=FetchPolicy(allow_hosts=frozenset({"10.0.0.1:6443"})))
    assert check_kubeconfig(text, policy).server == "https://10.0.0.1:6443"
    # The same host on another port is another service: still refused.
    assert _refused(kubeconfig_text(server="https://10.0.0.1:10250"), policy).field == "clusters[0].cluster.server"


def test_the_settings_allow_list_reaches_the_policy() -> None:
    policy = kubeconfig_policy(Settings(fetch_allow_hosts=["10.0.0.1:6443"]), compute_path=None)
    assert check_kubeconfig(kubeconfig_text(server="https://10.0.0.1:6443"), policy).server == "https://10.0.0.1:6443"


def test_a_server_the_operator_allows_for_one_compute_is_accepted_for_that_compute_alone() -> None:
    mine = "/subscriptions/Sub-A/resourceGroups/rg/accounts/acct/computes/prod"
    settings = Settings(compute_allow_hosts={mine: ["10.0.0.1:6443"]})
    text = kubeconfig_text(server="https://10.0.0.1:6443")
    in_any_case = mine.replace("Sub-A", "SUB-a").replace("acct", "ACCT")  # the account's part: ARM names
    assert check_kubeconfig(text, kubeconfig_policy(settings, compute_path=in_any_case)).server == (
        "https://10.0.0.1:6443"
    )
    for other in (
        "/subscriptions/sub-a/resourceGroups/rg/accounts/acct/computes/staging",  # the account's other compute
        "/subscriptions/sub-a/resourceGroups/rg/accounts/acct/computes/Prod",  # another: names are exact
        "/subscriptions/sub-b/resourceGroups/rg/accounts/acct/computes/prod",  # another tenant's, same names
        None,  # a compute whose path is not known
    ):
        assert _refused(text, kubeconfig_policy(settings, compute_path=other)).field == "clusters[0].cluster.server"
