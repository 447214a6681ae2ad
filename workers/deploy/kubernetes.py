"""The kubernetes target's objects for one service (docs/design/web-services.md, section 4).

Pure: builds the client's models from a ``ServiceDescription`` and connects to nothing;
workers/deploy/kubernetes_driver.py applies them with server-side apply. The replica is contained as on ``local``:
not root (the images' uid 10002), a read-only root with memory-backed ``/tmp`` and ``$HOME``,
no capabilities, no privilege escalation, seccomp's RuntimeDefault, no service account token,
requests = limits, and a NetworkPolicy that lets only the gateway in and nothing out. The
service's keys are the gateway's to check (design section 2): no object here carries one.

The ``kubernetes`` package is the ``kubernetes`` extra's, not the service image's (it would add
~140 MB to it): import this module only where that target is used.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kubernetes import client

from workers.build_context import PORT, RUN_GID, RUN_HOME, RUN_UID

__all__ = [
    "Autoscaler",
    "GatewayPeer",
    "KubernetesObjects",
    "PullCredential",
    "ServiceDescription",
    "ServiceSpecError",
    "build_objects",
]

MANAGED_BY = "mms"
SERVICE_LABEL = "org.mms.service"
ACCOUNT_LABEL = "org.mms.account"
GENERATION_LABEL = "org.mms.generation"
IMAGE_LABEL = "org.mms.image"  # on the pods: an update that fails is rolled back to the old one's image

# Azure's service names (3-32 lower-case letters, digits, '-'), which also makes every object
# name below a DNS-1123 label, as a Service's name must be.
_SERVICE_NAME = re.compile(r"[a-z][a-z0-9-]{1,30}[a-z0-9]")
# A label value: at most 63 characters, alphanumeric at both ends.
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
# The image is always run by digest: a tag could be moved under a running service.
_IMAGE_BY_DIGEST = re.compile(r"[^\s@]+@sha256:[0-9a-f]{64}")
_MIN_MEMORY_GB = 0.125


class ServiceSpecError(ValueError):
    """A service description the target cannot run; ``field`` names the API field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Autoscaler:
    """``deploymentConfig.autoScaler``: CPU-driven, between ``min_replicas`` and ``max_replicas``."""

    min_replicas: int
    max_replicas: int
    target_utilization: int  # percent of the CPU request


@dataclass(frozen=True)
class PullCredential:
    """How the cluster's nodes pull the image: a login to ``registry`` (``host[:port]``)."""

    registry: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class GatewayPeer:
    """The pods allowed to connect to replicas: the scoring gateway's, in its namespace."""

    namespace: str = "mms"
    pod_labels: Mapping[str, str] = field(default_factory=lambda: {"app.kubernetes.io/name": "mms-gateway"})


@dataclass(frozen=True)
class ServiceDescription:
    """What ``POST .../services`` asked for, as the kubernetes target needs it.

    Exactly one of ``replicas`` and ``autoscaler``. ``authEnabled`` and the keys are absent on
    purpose: the gateway checks keys, so nothing in the cluster depends on them.
    """

    name: str
    service_id: str
    account_id: str
    image: str  # <location>@sha256:<digest>
    # None: no pull Secret, the cluster pulls the image with its own access to the registry.
    pull_credential: PullCredential | None
    cpu: float
    memory_gb: float
    replicas: int | None = None
    autoscaler: Autoscaler | None = None
    generation: int = 1
    namespace: str = "default"
    gateway: GatewayPeer = field(default_factory=GatewayPeer)
    # The size of each memory-backed writable place (/tmp, $HOME); it counts against memory.
    tmp_mb: int = 64
    # How long init() may take before the first GET / answers (the smoke test's default).
    start_seconds: int = 120
    image_id: str | None = None  # the service's image (its id in this service), labelled on the pods


@dataclass(frozen=True)
class KubernetesObjects:
    """One service's objects; ``autoscaler`` is None for a fixed number of replicas, ``secret``
    when the cluster pulls the image without one."""

    secret: client.V1Secret | None = field(repr=False)  # its repr holds the pull login, barely encoded
    deployment: client.V1Deployment
    service: client.V1Service
    network_policy: client.V1NetworkPolicy
    autoscaler: client.V2HorizontalPodAutoscaler | None

    def in_apply_order(self) -> list[object]:
        """The pull secret before the pods that need it; the policy before they start."""
        ordered: list[object] = [self.network_policy, self.deployment, self.service]
        if self.secret is not None:
            ordered.insert(0, self.secret)
        if self.autoscaler is not None:
            ordered.append(self.autoscaler)
        return ordered


def object_name(description: ServiceDescription) -> str:
    """The objects' common name: the service's name and its id's start, since names are unique
    only in an account and two accounts may share a namespace."""
    suffix = re.sub(r"[^a-z0-9]", "", description.service_id.lower())[:8]
    return f"mms-{description.name}-{suffix}"


def build_objects(description: ServiceDescription) -> KubernetesObjects:
    """The Secret, Deployment, Service, NetworkPolicy and (when autoscaled) HPA of a service."""
    _check(description)
    name = object_name(description)
    labels = {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        SERVICE_LABEL: description.service_id,
        ACCOUNT_LABEL: description.account_id,
    }
    selector = {SERVICE_LABEL: description.service_id}
    pull_secret = None if description.pull_credential is None else _pull_secret(description, f"{name}-pull", labels)
    return KubernetesObjects(
        secret=pull_secret,
        deployment=_deployment(description, name, labels, selector, pull_secret and pull_secret.metadata.name),
        service=_service(description, name, labels, selector),
        network_policy=_network_policy(description, name, labels, selector),
        autoscaler=None if description.autoscaler is None else _autoscaler(description, name, labels),
    )


def _check(description: ServiceDescription) -> None:
    if not _SERVICE_NAME.fullmatch(description.name):
        raise ServiceSpecError("name", "3 to 32 lower-case letters, digits and '-', starting with a letter")
    for what, value in (("serviceId", description.service_id), ("accountId", description.account_id)):
        if not _LABEL_VALUE.fullmatch(value):
            raise ServiceSpecError(what, "must be usable as a label value (at most 63 letters, digits, '-', '_', '.')")
    if not _IMAGE_BY_DIGEST.fullmatch(description.image):
        raise ServiceSpecError("imageLocation", "the image must be named by digest: <location>@sha256:<64 hex>")
    if not description.cpu > 0:
        raise ServiceSpecError("deploymentConfig.containerResourceRequirements.cpu", "must be above 0")
    if not description.memory_gb >= _MIN_MEMORY_GB:
        raise ServiceSpecError(
            "deploymentConfig.containerResourceRequirements.memoryInGB", f"must be at least {_MIN_MEMORY_GB}"
        )
    scaler = description.autoscaler
    if (description.replicas is None) == (scaler is None):
        raise ServiceSpecError("deploymentConfig.numReplicas", "give either numReplicas or an autoScaler, not both")
    if description.replicas is not None and description.replicas < 1:
        raise ServiceSpecError("deploymentConfig.numReplicas", "must be at least 1")
    if scaler is not None:
        if scaler.min_replicas < 1:
            raise ServiceSpecError("deploymentConfig.autoScaler.minReplicas", "must be at least 1")
        if scaler.max_replicas < scaler.min_replicas:
            raise ServiceSpecError("deploymentConfig.autoScaler.maxReplicas", "must be at least minReplicas")
        if not 1 <= scaler.target_utilization <= 100:
            raise ServiceSpecError("deploymentConfig.autoScaler.targetUtilization", "must be between 1 and 100")
    if description.generation < 1:
        raise ServiceSpecError("generation", "must be at least 1")
    if description.image_id is not None and not _LABEL_VALUE.fullmatch(description.image_id):
        raise ServiceSpecError("imageId", "must be usable as a label value")


def _metadata(description: ServiceDescription, name: str, labels: Mapping[str, str]) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(name=name, namespace=description.namespace, labels=dict(labels))


def _pull_secret(description: ServiceDescription, name: str, labels: Mapping[str, str]) -> client.V1Secret:
    credential = description.pull_credential
    assert credential is not None
    login = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
    config = {
        "auths": {
            credential.registry: {"username": credential.username, "password": credential.password, "auth": login}
        }
    }
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=_metadata(description, name, labels),
        type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": base64.b64encode(json.dumps(config).encode()).decode()},
    )


def _probe(*, period: int, failures: int) -> client.V1Probe:
    # The smoke test's probe: GET / on the scoring port answers 200 once init() has run.
    return client.V1Probe(
        http_get=client.V1HTTPGetAction(path="/", port=PORT, scheme="HTTP"),
        period_seconds=period,
        timeout_seconds=2,
        failure_threshold=failures,
    )


def _deployment(
    description: ServiceDescription,
    name: str,
    labels: Mapping[str, str],
    selector: Mapping[str, str],
    pull_secret: str | None,
) -> client.V1Deployment:
    cpu = f"{max(1, round(description.cpu * 1000))}m"
    memory = f"{max(1, round(description.memory_gb * 1024))}Mi"
    # requests = limits: the scheduler reserves what the replica may use (Guaranteed QoS).
    resources = client.V1ResourceRequirements(
        requests={"cpu": cpu, "memory": memory}, limits={"cpu": cpu, "memory": memory}
    )
    container = client.V1Container(
        name="scoring",
        image=description.image,
        image_pull_policy="IfNotPresent",
        # No key, no token: the scoring server's port is all the image is told.
        env=[client.V1EnvVar(name="PORT", value=str(PORT))],
        ports=[client.V1ContainerPort(name="http", container_port=PORT, protocol="TCP")],
        resources=resources,
        # Until the first GET / answers (init() may load a large model) liveness does not count.
        startup_probe=_probe(period=2, failures=max(1, description.start_seconds // 2)),
        readiness_probe=_probe(period=2, failures=2),
        liveness_probe=_probe(period=10, failures=3),
        security_context=client.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_UID,
            run_as_group=RUN_GID,
            privileged=False,
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
        # The builders make only /tmp and $HOME writable; the root stays read-only.
        volume_mounts=[
            client.V1VolumeMount(name="tmp", mount_path="/tmp"),
            client.V1VolumeMount(name="home", mount_path=RUN_HOME),
        ],
    )
    scratch = f"{description.tmp_mb}Mi"
    pod = client.V1PodSpec(
        containers=[container],
        image_pull_secrets=None if pull_secret is None else [client.V1LocalObjectReference(name=pull_secret)],
        automount_service_account_token=False,
        enable_service_links=False,
        host_network=False,
        host_pid=False,
        host_ipc=False,
        security_context=client.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=RUN_UID,
            run_as_group=RUN_GID,
            fs_group=RUN_GID,
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[
            client.V1Volume(name=volume, empty_dir=client.V1EmptyDirVolumeSource(medium="Memory", size_limit=scratch))
            for volume in ("tmp", "home")
        ],
    )
    scaler = description.autoscaler
    pod_labels = {**labels, GENERATION_LABEL: str(description.generation)}
    if description.image_id is not None:
        pod_labels[IMAGE_LABEL] = description.image_id
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_metadata(description, name, labels),
        spec=client.V1DeploymentSpec(
            # Autoscaled: no count at all. The driver applies these objects on every pass, and a
            # count in them would undo the HPA's scaling each time (the HPA starts it at minReplicas).
            replicas=description.replicas if scaler is None else None,
            selector=client.V1LabelSelector(match_labels=dict(selector)),
            # A new replica is ready before an old one goes: capacity never drops in an update.
            strategy=client.V1DeploymentStrategy(
                type="RollingUpdate",
                rolling_update=client.V1RollingUpdateDeployment(max_surge=1, max_unavailable=0),
            ),
            revision_history_limit=2,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=pod_labels),
                spec=pod,
            ),
        ),
    )


def _service(
    description: ServiceDescription, name: str, labels: Mapping[str, str], selector: Mapping[str, str]
) -> client.V1Service:
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(description, name, labels),
        spec=client.V1ServiceSpec(
            type="ClusterIP",
            selector=dict(selector),
            ports=[client.V1ServicePort(name="http", port=PORT, target_port=PORT, protocol="TCP")],
        ),
    )


def _network_policy(
    description: ServiceDescription, name: str, labels: Mapping[str, str], selector: Mapping[str, str]
) -> client.V1NetworkPolicy:
    gateway = description.gateway
    return client.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=_metadata(description, name, labels),
        spec=client.V1NetworkPolicySpec(
            pod_selector=client.V1LabelSelector(match_labels=dict(selector)),
            # Both kinds listed and no egress rule: the replicas may open no connection at all
            # (not even DNS), as on local (design section 1, "Egress: none").
            policy_types=["Ingress", "Egress"],
            ingress=[
                client.V1NetworkPolicyIngressRule(
                    _from=[
                        client.V1NetworkPolicyPeer(
                            namespace_selector=client.V1LabelSelector(
                                match_labels={"kubernetes.io/metadata.name": gateway.namespace}
                            ),
                            pod_selector=client.V1LabelSelector(match_labels=dict(gateway.pod_labels)),
                        )
                    ],
                    ports=[client.V1NetworkPolicyPort(port=PORT, protocol="TCP")],
                )
            ],
            egress=[],
        ),
    )


def _autoscaler(
    description: ServiceDescription, name: str, labels: Mapping[str, str]
) -> client.V2HorizontalPodAutoscaler:
    scaler = description.autoscaler
    assert scaler is not None
    return client.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=_metadata(description, name, labels),
        spec=client.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=client.V2CrossVersionObjectReference(api_version="apps/v1", kind="Deployment", name=name),
            min_replicas=scaler.min_replicas,
            max_replicas=scaler.max_replicas,
            metrics=[
                client.V2MetricSpec(
                    type="Resource",
                    resource=client.V2ResourceMetricSource(
                        name="cpu",
                        target=client.V2MetricTarget(type="Utilization", average_utilization=scaler.target_utilization),
                    ),
                )
            ],
        ),
    )
