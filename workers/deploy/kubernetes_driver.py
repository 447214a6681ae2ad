"""The ``kubernetes`` target: a service as the objects of workers/deploy/kubernetes.py in a
tenant's cluster, applied with server-side apply (field manager ``mms``) when the cluster does
not hold them as described.

Connecting: the tenant's kubeconfig passes the service's policy and the worker's address check
(workers/deploy/kubeconfig.py) each time a pass connects, and the client then connects to the
address checked, not to the name resolved anew (the name still goes to TLS, for SNI and the
certificate check), with no proxy from the environment and no redirect followed. The inline
CA and client certificate are written to a private temporary folder removed at close (the
client takes files); the token, password and key never reach a message: the cluster's own
messages are cut short and have them cut out.

The server is the tenant's to choose, so its answers are read as an attacker's: at most
``_MAX_ANSWER_BYTES`` of one (``_MAX_ERROR_BYTES`` of an error's, whose message is all that is
used: the client would read a whole error body into memory), each call within ``_CALL_SECONDS``
and all of a pass's within ``_PASS_SECONDS`` (a server that sends a byte now and then never
trips a read timeout; past the deadline its connections are shut down), so no cluster holds a
deploy thread, which every tenant's passes share, for long.

Applying: a pass applies each object its spec describes that is missing, whose
``org.mms.applied`` annotation is not the digest of the description, or whose spec another
manager changed (its ``managedFields``); the others it only reads (a settled service's passes,
every 10 s, write nothing). So a scale, an image swap (a new generation: the pods' template
changes), a roll back and a resize are one re-apply each, and the Deployment's rolling update
(maxSurge 1, maxUnavailable 0) does the rollout: the old pods serve until new ones are ready.
An autoscaled Deployment carries no count (the HPA's).

Observing: the Deployment (its ProgressDeadlineExceeded condition, the count the HPA gave it)
and its pods, by the service's label, in the target's namespace only. A pod is a replica,
ready when its Ready condition is true (its readiness probe is the smoke test's ``GET /``); a
pod of the desired generation in CrashLoopBackOff (or that cannot start: ImagePullBackOff,
InvalidImageName, CreateContainerConfigError) fails the generation, with its container's last
lines read through ``read_namespaced_pod_log``.

The scoring gateway never routes here: the gateway cannot reach a cluster's pods, and an address
a tenant's cluster reports must never become one the gateway connects to. The Service's cluster
address (``spec.clusterIP``, as the cluster reports it) is the service's endpoint instead.

The ``kubernetes`` package is the ``kubernetes`` extra's: workers.deploy.reconcile imports this
module only for a kubernetes target, and fails the service saying so when it is missing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import urllib3
import urllib3.connection
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from app.addresses import in_service_pool
from app.deployments.reconciler import Failure, LogLine, Replica, Spec
from workers.build_context import PORT
from workers.deploy.kubeconfig import KubeconfigPolicy, KubeconfigRefused, check_kubeconfig
from workers.deploy.kubernetes import (
    GENERATION_LABEL,
    IMAGE_LABEL,
    MANAGED_BY,
    SERVICE_LABEL,
    Autoscaler,
    ServiceDescription,
    ServiceSpecError,
    build_objects,
    object_name,
)
from workers.deploy.local import (
    LOG_LINES_PER_PASS,
    EngineUnreachable,
    TargetRefused,
    parse_log_lines,
    pinned_reference,
)
from workers.fetch_policy import FOR_THIS_COMPUTE
from workers.fetcher import FetchError, Resolver, check_url
from workers.smoke_test import last_error_line

__all__ = ["APPLIED_ANNOTATION", "CONTAINER", "FIELD_MANAGER", "KubernetesDriver", "describe"]

log = logging.getLogger("mms.deploy.kubernetes")

FIELD_MANAGER = "mms"
# On each applied object: the digest of the object as described (without this annotation), so
# a pass tells whether the cluster holds what the spec describes without applying it again.
APPLIED_ANNOTATION = "org.mms.applied"
# The parts of an object whose change by another manager is drift (a Deployment's annotations
# are its controller's to write, its count through the scale subresource the HPA's).
_DESCRIBED_FIELDS = frozenset({"f:spec", "f:data", "f:stringData", "f:type"})
CONTAINER = "scoring"  # the one container of a replica (workers/deploy/kubernetes.py)
_MANAGED = f"app.kubernetes.io/managed-by={MANAGED_BY}"
_APPLY = "application/apply-patch+yaml"
_TIMEOUT = (5.0, 15.0)  # connect, each read: a pass stays well inside its lease
_MAX_ANSWER_BYTES = 8 * 1024 * 1024  # one answer of the cluster, read at most (a list of pods, a log)
_MAX_ERROR_BYTES = 64 * 1024  # of an answer with an error status: its Status message is all that is read
_CALL_SECONDS = 30.0  # one call, its answer read whole, however the server trickles it
_PASS_SECONDS = 120.0  # every call of one driver (one pass) together
_MESSAGE_CHARS = 300  # of a message the cluster sends back
_LOG_TAIL = 80  # lines of a failed replica kept in the service's error
_MAX_LOG_PODS = 32  # pods whose new lines one pass copies
_LOG_BYTES = LOG_LINES_PER_PASS * 4 * 1024  # of one pod's log a pass asks for (limitBytes)
# A pod of the desired generation waiting for one of these will not start by waiting longer.
_CANNOT_START = frozenset({"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "ErrImageNeverPull"})
# Each kind of object the service has: the typed API that serves it and its methods' suffix.
_KINDS = {
    "Secret": ("core", "namespaced_secret"),
    "NetworkPolicy": ("networking", "namespaced_network_policy"),
    "Deployment": ("apps", "namespaced_deployment"),
    "Service": ("core", "namespaced_service"),
    "HorizontalPodAutoscaler": ("autoscaling", "namespaced_horizontal_pod_autoscaler"),
}


def describe(spec: Spec, *, namespace: str, tmp_mb: int) -> ServiceDescription:
    """What the objects of ``spec`` are built from. No pull credential: the cluster pulls the
    image with its own access to the registry (README, "the kubernetes target")."""
    if not spec.image_location:
        raise TargetRefused(f"image {spec.image_id} has no location to pull from")
    scaler = spec.autoscaler or {}
    autoscaler = None
    if scaler.get("autoscaleEnabled"):
        autoscaler = Autoscaler(
            min_replicas=int(scaler.get("minReplicas") or 1),
            max_replicas=int(scaler.get("maxReplicas") or 1),
            target_utilization=int(scaler.get("targetUtilization") or 70),
        )
    return ServiceDescription(
        name=spec.name,
        service_id=str(spec.id),
        account_id=str(spec.account_id),
        image=pinned_reference(spec.image_location, spec.image_digest),
        pull_credential=None,
        cpu=spec.cpu,
        memory_gb=spec.memory_gb,
        replicas=None if autoscaler else spec.replicas,
        autoscaler=autoscaler,
        generation=spec.generation,
        namespace=namespace,
        tmp_mb=tmp_mb,
        image_id=str(spec.image_id),
    )


class KubernetesDriver:
    """One pass's connection to a tenant's cluster, through its checked kubeconfig."""

    def __init__(
        self,
        kubeconfig: str,
        *,
        namespace: str,
        policy: KubeconfigPolicy | None = None,
        tmp_mb: int = 64,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        unanswered: list[str] = []  # one entry a lookup until it answers

        def resolving(host: str, *args: Any, **kwargs: Any) -> Sequence[tuple[Any, ...]]:
            # A lookup that failed or did not answer in time (the fetcher gives up on it): the
            # name may resolve later. Each lookup counts (the server's name is looked up twice).
            unanswered.append(str(host))
            addresses = resolver(host, *args, **kwargs)
            unanswered.remove(str(host))
            return addresses

        policy = policy or KubeconfigPolicy()
        try:
            checked = check_kubeconfig(kubeconfig, policy, resolver=resolving)
            # The server's address, checked once more and kept: the client connects to it.
            address = check_url(checked.server, policy=policy.fetch, resolver=resolving)
        except (KubeconfigRefused, FetchError) as exc:
            unresolved = list(unanswered)
            if unresolved:  # the name did not resolve now: maybe later
                raise EngineUnreachable(
                    f"the kubernetes cluster's server name {unresolved[0]} does not resolve"
                ) from None
            # A private server refused (the fetcher's words name the installation's list).
            hint = FOR_THIS_COMPUTE if "MMS_FETCH_ALLOW_HOSTS" in str(exc) else ""
            raise TargetRefused(f"the kubernetes target's kubeconfig is refused: {exc}{hint}") from None
        if policy.service_pool and in_service_pool(address, policy.service_pool):  # allowed or not, as a manager
            raise TargetRefused(
                "the kubernetes target's server is refused: its address is in the operator's service networks "
                "(MMS_SERVICE_SUBNET_POOL), where other services' replicas answer"
            )
        self._namespace = namespace
        self._tmp_mb = tmp_mb
        # A username and password go as base64 of "username:password": as good as the password.
        self._login: str | None = None
        if checked.username and not checked.token:
            self._login = base64.b64encode(f"{checked.username}:{checked.password or ''}".encode()).decode()
        self._secrets = tuple(
            value
            for value in (
                checked.token,
                checked.password,
                self._login,
                checked.client_key_data,
                checked.client_certificate_data,
            )
            if value
        )
        parts = urlsplit(checked.server)
        host = parts.hostname or ""
        port = parts.port or 443
        self._where = f"{host}:{port}"  # for messages: no userinfo, no path
        self.scaled_to: int | None = None  # the Deployment's count, as the HPA set it (observe)
        # What ``apply`` read or applied, for the pass's ``observe`` and ``endpoint`` to use once.
        self._fresh: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._ends = time.monotonic() + _PASS_SECONDS
        self._connections = _Connections()
        self._folder = tempfile.TemporaryDirectory(prefix="mms-kube-")
        try:
            self._api = client.ApiClient(self._configuration(checked, host, port, parts.path, address))
        except BaseException:
            self._folder.cleanup()
            raise
        rest = self._api.rest_client
        rest.pool_manager.pool_classes_by_scheme = {"https": self._connections.pool_class()}
        rest.pool_manager = _BoundedErrors(rest.pool_manager)
        self._apis = {
            "core": client.CoreV1Api(self._api),
            "apps": client.AppsV1Api(self._api),
            "networking": client.NetworkingV1Api(self._api),
            "autoscaling": client.AutoscalingV2Api(self._api),
        }

    def _configuration(self, checked: Any, host: str, port: int, path: str, address: str) -> client.Configuration:
        configuration = client.Configuration()
        pinned = f"[{address}]" if ":" in address else address
        configuration.host = f"https://{pinned}:{port}{path.rstrip('/')}"
        # The client reads HTTPS_PROXY and the like from the environment: the tenant's token and
        # the pinned address must not go through whatever proxy the worker's host has set.
        configuration.proxy = None
        configuration.no_proxy = None
        # One try, no redirect followed: a redirect would lead the worker to an address no check saw.
        configuration.retries = urllib3.Retry(total=0, redirect=False)
        configuration.verify_ssl = not checked.insecure_skip_tls_verify
        name = checked.tls_server_name or (None if _is_address(host) else host)
        if name and configuration.verify_ssl:
            configuration.tls_server_name = name  # SNI
            configuration.assert_hostname = name  # the certificate is checked for the name, not the address
        if checked.certificate_authority_data:
            configuration.ssl_ca_cert = self._file("ca.crt", checked.certificate_authority_data)
        if checked.client_certificate_data:
            configuration.cert_file = self._file("client.crt", checked.client_certificate_data)
            configuration.key_file = self._file("client.key", checked.client_key_data or "")
        if checked.token:
            configuration.api_key = {"BearerToken": checked.token}
            configuration.api_key_prefix = {"BearerToken": "Bearer"}
        elif self._login is not None:
            configuration.api_key = {"BearerToken": f"Basic {self._login}"}
        return configuration

    def _file(self, name: str, data: str) -> str:
        """``data`` (base64, as a kubeconfig's ``*-data``) decoded into a file only this user reads."""
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise TargetRefused(f"the kubernetes target's kubeconfig holds {name} data that is not base64") from None
        path = Path(self._folder.name) / name
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(decoded)
        return str(path)

    def close(self) -> None:
        self._api.rest_client.pool_manager.clear()
        self._api.close()
        self._folder.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- what a pass does ----------------------------------------------------------------------

    def apply(self, spec: Spec) -> list[str]:
        """Apply those of the objects ``spec`` describes that the cluster does not hold as
        described (server-side apply); their kinds. An object is applied when it is missing,
        when its ``APPLIED_ANNOTATION`` is not the digest of what is described now (the spec
        changed, or someone replaced it), or when another manager changed its spec; otherwise
        it is only read: a settled service's pass writes nothing. An autoscaler no longer asked
        for goes."""
        try:
            objects = build_objects(describe(spec, namespace=self._namespace, tmp_mb=self._tmp_mb))
        except ServiceSpecError as exc:
            raise TargetRefused(f"the service cannot run on a kubernetes target: {exc}") from None
        applied: list[str] = []
        for obj in objects.in_apply_order():
            body = self._api.sanitize_for_serialization(obj)
            kind, name = body["kind"], body["metadata"]["name"]
            digest = _digest(body)
            body["metadata"].setdefault("annotations", {})[APPLIED_ANNOTATION] = digest
            held = self._read(kind, name)
            if held is not None and _as_applied(held, digest):
                self._fresh[(kind, name)] = held
                continue
            answer = self._json(
                self._method(kind, "patch"),
                name,
                self._namespace,
                body,
                field_manager=FIELD_MANAGER,
                force=True,  # these objects are this service's alone: its apply wins
                _content_type=_APPLY,
            )
            self._fresh[(kind, name)] = _mapping(answer)
            applied.append(kind)
        hpa = objects.deployment.metadata.name
        if objects.autoscaler is None and self._read("HorizontalPodAutoscaler", hpa) is not None:
            self._delete("HorizontalPodAutoscaler", hpa)
        if applied:
            log.info(
                "deploy.applied",
                extra={
                    "service": str(spec.id),
                    "generation": spec.generation,
                    "namespace": self._namespace,
                    "kinds": applied,
                },
            )
        return applied

    def observe(self, spec: Spec) -> tuple[list[Replica], Failure | None]:
        """The service's pods as replicas; and, when the desired generation will not start, why."""
        deployment = self._read("Deployment", self._name(spec), fresh=True) or {}
        scaled = _mapping(deployment.get("spec")).get("replicas")
        self.scaled_to = scaled if isinstance(scaled, int) and not isinstance(scaled, bool) else None
        pods = [_mapping(p) for p in _list(self._list("Pod", _selector(spec.id)))]
        seen = [(pod, replica) for pod in pods if (replica := _replica(pod)) is not None]
        return [replica for _, replica in seen], self._failure(spec, deployment, seen)

    def read_logs(self, spec: Spec, replicas: Sequence[Replica]) -> list[LogLine]:
        """What each pod printed since the newest line already copied (at most
        ``LOG_LINES_PER_PASS`` a pod, of at most ``_MAX_LOG_PODS`` pods)."""
        lines: list[LogLine] = []
        for replica in [r for r in replicas if r.alive][:_MAX_LOG_PODS]:
            raw = self._log(replica.id, timestamps=True, tail_lines=LOG_LINES_PER_PASS, limit_bytes=_LOG_BYTES)
            # The last lines only, whatever the cluster sent: it may ignore tailLines and limitBytes.
            tail = b"\n".join(raw.splitlines()[-LOG_LINES_PER_PASS:])
            lines += parse_log_lines(tail, replica, after_ns=spec.log_marks.get(replica.id, 0))
        return lines

    def endpoint(self, spec: Spec) -> str | None:
        """``address:port`` of the service's Service, as the cluster reports it (None before it
        has one): reachable from inside the cluster only."""
        service = self._read("Service", self._name(spec), fresh=True) or {}
        address = _mapping(service.get("spec")).get("clusterIP")
        try:
            ip = ipaddress.ip_address(address) if isinstance(address, str) else None
        except ValueError:
            ip = None
        # A unicast address only: a zone id ("fe80::1%<anything>") would put the cluster's text in
        # the scoring URI, where "[fe80::1%@elsewhere?]" reads as a URL of another host.
        if ip is None or getattr(ip, "scope_id", None) is not None or ip.is_multicast or ip.is_unspecified:
            return None
        return f"[{ip}]:{PORT}" if ip.version == 6 else f"{ip}:{PORT}"

    def remove_all(self, service_id: uuid.UUID) -> bool:
        """Every object the service's applies made, found by its labels in the target's
        namespace; whether nothing is left. Its NetworkPolicy goes last, once its pods are gone
        (a pod still terminating stays contained)."""
        selector = _selector(service_id)
        for kind in ("HorizontalPodAutoscaler", "Deployment", "Service", "Secret"):
            for name in self._names(kind, selector):
                self._delete(kind, name)
        if self._list("Pod", selector):
            return False
        for name in self._names("NetworkPolicy", selector):
            self._delete("NetworkPolicy", name)
        left = [kind for kind in _KINDS if self._names(kind, selector)]
        return not left

    # -- the cluster's answers -----------------------------------------------------------------

    def _failure(
        self, spec: Spec, deployment: Mapping[str, Any], seen: Sequence[tuple[Mapping, Replica]]
    ) -> Failure | None:
        """Why the desired generation will never serve, if the cluster says so."""
        desired = [(pod, r) for pod, r in seen if r.generation == spec.generation and r.alive and not r.ready]
        for pod, replica in desired:
            for status in _list(_mapping(pod.get("status")).get("containerStatuses")):
                waiting = _mapping(_mapping(_mapping(status).get("state")).get("waiting"))
                reason = waiting.get("reason")
                if reason == "CrashLoopBackOff":
                    logs = self._last_lines(replica.id)
                    how = "ran out of memory" if replica.oom_killed else f"exited with code {replica.exit_code}"
                    return Failure(
                        f"a replica {how} {replica.restarts} times before it answered GET / "
                        f"(CrashLoopBackOff){last_error_line(logs)}",
                        logs,
                    )
                if reason in _CANNOT_START:
                    return Failure(f"the cluster cannot start a replica ({reason}){self._said(waiting.get('message'))}")
        template = _mapping(_mapping(_mapping(deployment.get("spec")).get("template")).get("metadata"))
        if _mapping(template.get("labels")).get(GENERATION_LABEL) != str(spec.generation):
            return None
        for condition in _list(_mapping(deployment.get("status")).get("conditions")):
            condition = _mapping(condition)
            if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
                logs = self._last_lines(desired[0][1].id) if desired else ""
                return Failure(
                    "the Deployment made no progress within its deadline (ProgressDeadlineExceeded)"
                    f"{self._said(condition.get('message'))}",
                    logs,
                )
        return None

    def _last_lines(self, pod: str) -> str:
        """The last lines of the pod's container: of its previous run when it is restarting."""
        options = {"tail_lines": _LOG_TAIL, "limit_bytes": _LOG_BYTES}
        raw = self._log(pod, previous=True, **options) or self._log(pod, **options)
        tail = b"\n".join(raw.splitlines()[-_LOG_TAIL:])  # whatever the cluster sent
        return self._redacted(tail.decode("utf-8", "replace")).rstrip()

    def _log(self, pod: str, **options: Any) -> bytes:
        read = self._apis["core"].read_namespaced_pod_log
        # A container that has not started, or has no previous run, is a 400: nothing to read.
        raw = self._call(read, pod, self._namespace, container=CONTAINER, missing=(400, 404), **options)
        return raw or b""

    def _name(self, spec: Spec) -> str:
        try:
            return object_name(describe(spec, namespace=self._namespace, tmp_mb=self._tmp_mb))
        except ServiceSpecError as exc:
            raise TargetRefused(f"the service cannot run on a kubernetes target: {exc}") from None

    def _read(self, kind: str, name: str, *, fresh: bool = False) -> Mapping[str, Any] | None:
        """The object as the cluster holds it; None when it has none. ``fresh``: as this pass's
        ``apply`` read or applied it a moment ago, if it did (once: not read twice a pass)."""
        if fresh and (held := self._fresh.pop((kind, name), None)) is not None:
            return held
        found = self._json(self._method(kind, "read"), name, self._namespace, missing=(404,))
        return None if found is None else _mapping(found)

    def _method(self, kind: str, verb: str) -> Callable[..., Any]:
        api, suffix = _KINDS[kind]
        return getattr(self._apis[api], f"{verb}_{suffix}")

    def _list(self, kind: str, selector: str) -> list[Any]:
        method = self._apis["core"].list_namespaced_pod if kind == "Pod" else self._method(kind, "list")
        return _list(_mapping(self._json(method, self._namespace, label_selector=selector)).get("items"))

    def _names(self, kind: str, selector: str) -> list[str]:
        names = (_mapping(_mapping(item).get("metadata")).get("name") for item in self._list(kind, selector))
        return [name for name in names if isinstance(name, str)]

    def _delete(self, kind: str, name: str) -> None:
        self._call(self._method(kind, "delete"), name, self._namespace, propagation_policy="Background", missing=(404,))

    def _json(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raw = self._call(method, *args, **kwargs)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineUnreachable(
                f"the kubernetes cluster at {self._where} answered something that is not JSON"
            ) from None

    def _call(
        self, method: Callable[..., Any], *args: Any, missing: tuple[int, ...] = (), **kwargs: Any
    ) -> bytes | None:
        """The raw answer of one call (None for a status in ``missing``), read at most
        ``_MAX_ANSWER_BYTES`` within the call's deadline; the cluster's refusals, silences and
        dawdling as the reconciler's errors."""
        left = self._ends - time.monotonic()
        if left <= 0:
            raise self._late(by_pass=True)
        limit = min(_CALL_SECONDS, left)
        late = threading.Event()
        timer = threading.Timer(limit, self._connections.cut, args=(late,))
        timer.daemon = True
        timer.start()
        try:
            raw = self._answer(method, *args, missing=missing, **kwargs)
        except Exception:
            if late.is_set():  # whatever the cut made of the answer
                raise self._late(by_pass=limit < _CALL_SECONDS) from None
            raise
        finally:
            timer.cancel()
        if late.is_set():
            raise self._late(by_pass=limit < _CALL_SECONDS)
        return raw

    def _answer(
        self, method: Callable[..., Any], *args: Any, missing: tuple[int, ...] = (), **kwargs: Any
    ) -> bytes | None:
        try:
            response = method(*args, _preload_content=False, _request_timeout=_TIMEOUT, **kwargs)
        except ApiException as exc:
            if exc.status in missing:
                return None
            raise self._refusal(exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._silence(exc) from None
        try:
            raw = response.read(_MAX_ANSWER_BYTES + 1)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            response.close()
            raise self._silence(exc) from None
        if len(raw) > _MAX_ANSWER_BYTES:
            response.close()  # the rest unread: the connection is not reused
            raise EngineUnreachable(
                f"the kubernetes cluster at {self._where} answered more than {_MAX_ANSWER_BYTES} bytes"
            )
        response.release_conn()
        return raw

    def _late(self, *, by_pass: bool) -> EngineUnreachable:
        if by_pass:
            return EngineUnreachable(
                f"the kubernetes cluster at {self._where} did not finish answering within {_PASS_SECONDS:g} s "
                "(all of a pass's calls)"
            )
        return EngineUnreachable(
            f"the kubernetes cluster at {self._where} did not finish answering within {_CALL_SECONDS:g} s"
        )

    def _silence(self, exc: BaseException) -> EngineUnreachable:
        return EngineUnreachable(f"the kubernetes cluster at {self._where} did not answer ({type(exc).__name__})")

    def _refusal(self, exc: ApiException) -> Exception:
        """A status the cluster answered: unreachable (retried) when it may pass, refused when
        the tenant must change something. Never ``str(exc)``: it holds every header and the body."""
        status = exc.status if isinstance(exc.status, int) else 0
        if status == 0:  # the client's own: the TLS handshake failed
            return EngineUnreachable(
                f"the kubernetes cluster at {self._where} failed the TLS check (its certificate is not one the "
                "kubeconfig's certificate-authority-data vouches for)"
            )
        said = self._said(_status_message(exc.body))
        if status >= 500 or status in (408, 429) or 300 <= status < 400:
            return EngineUnreachable(f"the kubernetes cluster at {self._where} answered {status}{said}")
        if status in (401, 403):
            return TargetRefused(
                f"the kubernetes cluster at {self._where} refused the kubeconfig's credentials ({status}){said}"
            )
        return TargetRefused(f"the kubernetes cluster at {self._where} refused a request ({status}){said}")

    def _said(self, message: object) -> str:
        """': <message>', a message of the cluster's made fit for the service's error."""
        if not isinstance(message, str) or not message.strip():
            return ""
        # Cut out before the whitespace is tidied: a password may hold runs of it.
        return f": {' '.join(self._redacted(message).split())[:_MESSAGE_CHARS]}"

    def _redacted(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Connections:
    """A driver's connections to the cluster, to shut down when a call outlives its deadline
    (a read blocked on a server that dawdles then returns at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[_WatchedConnection] = []

    def pool_class(self) -> type[urllib3.HTTPSConnectionPool]:
        watch = self

        class Connection(_WatchedConnection):
            connections = watch

        class Pool(urllib3.HTTPSConnectionPool):
            ConnectionCls = Connection

        return Pool

    def add(self, connection: _WatchedConnection) -> None:
        with self._lock:
            self._open = [c for c in self._open if c.sock is not None]
            self._open.append(connection)

    def cut(self, late: threading.Event) -> None:
        """The call is late: end every connection's reads and writes (called on the timer's thread)."""
        late.set()
        with self._lock:
            sockets = [c.sock for c in self._open if c.sock is not None]
        for sock in sockets:
            with contextlib.suppress(OSError):
                # socket.socket's own: on an SSLSocket it leaves the TLS state alone for the
                # reader, which then sees the connection end.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedConnection(urllib3.connection.HTTPSConnection):
    """Noted once connected. (Its TLS handshake is bounded already: the connect timeout is
    one deadline for the whole handshake, however the server trickles it.)"""

    connections: _Connections

    def connect(self) -> None:
        super().connect()
        self.connections.add(self)


class _ErrorAnswer:
    """An answer with an error status, as the client's ApiException reads one."""

    def __init__(self, status: int, reason: str | None, data: bytes, headers: Mapping[str, str]) -> None:
        self.status, self.reason, self.data, self._headers = status, reason, data, headers

    def getheaders(self) -> Mapping[str, str]:
        return self._headers


class _BoundedErrors:
    """The client's pool manager, but an answer with an error status comes back with its first
    ``_MAX_ERROR_BYTES`` only: the client reads a whole error body into memory (ApiException's
    ``http_resp.data``), and a hostile server's may never end."""

    def __init__(self, pool_manager: urllib3.PoolManager) -> None:
        self._pool_manager = pool_manager

    def request(self, *args: Any, **kwargs: Any) -> Any:
        response = self._pool_manager.request(*args, **kwargs)
        if 200 <= response.status <= 299:
            return response
        data = response.read(_MAX_ERROR_BYTES + 1)
        if len(data) > _MAX_ERROR_BYTES:
            response.close()  # the rest unread: the connection is not reused
        else:
            response.release_conn()
        return _ErrorAnswer(response.status, response.reason, data[:_MAX_ERROR_BYTES], dict(response.headers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool_manager, name)


def _digest(body: Mapping[str, Any]) -> str:
    """The digest of an object as described: the same for the same spec, in every process."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _as_applied(held: Mapping[str, Any], digest: str) -> bool:
    """Does the cluster hold the object as last applied from a description of ``digest``: its
    annotation says so, and no other manager has changed its described fields since (an
    ``Update`` of its own, not through a subresource: a status, the HPA's scale)?"""
    metadata = _mapping(held.get("metadata"))
    if _mapping(metadata.get("annotations")).get(APPLIED_ANNOTATION) != digest:
        return False
    for entry in _list(metadata.get("managedFields")):
        entry = _mapping(entry)
        if entry.get("manager") == FIELD_MANAGER or entry.get("subresource") or entry.get("operation") != "Update":
            continue
        if _DESCRIBED_FIELDS & set(_mapping(entry.get("fieldsV1"))):
            return False
    return True


def _selector(service_id: uuid.UUID | str) -> str:
    return f"{SERVICE_LABEL}={service_id},{_MANAGED}"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _status_message(body: object) -> object:
    """The ``message`` of a Status the cluster answered, if its body is one."""
    if isinstance(body, bytes):
        body = body[:_MAX_ANSWER_BYTES].decode("utf-8", "replace")
    try:
        return _mapping(json.loads(body)).get("message") if isinstance(body, str) else None
    except ValueError:
        return None


def _mapping(value: object) -> Mapping[str, Any]:
    """``value`` if the cluster sent a mapping there, else an empty one: its answers are data
    from another party, whose every field may be missing or of another type."""
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    try:
        return int(str(value))
    except ValueError:
        return 0


def _replica(pod: Mapping[str, Any]) -> Replica | None:
    """A pod as the reconciler's replica (no address: the gateway never routes to a pod)."""
    metadata = _mapping(pod.get("metadata"))
    name = metadata.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        return None
    labels = _mapping(metadata.get("labels"))
    status = _mapping(pod.get("status"))
    alive = status.get("phase") not in ("Succeeded", "Failed") and not metadata.get("deletionTimestamp")
    ready = any(
        _mapping(c).get("type") == "Ready" and _mapping(c).get("status") == "True"
        for c in _list(status.get("conditions"))
    )
    containers = [_mapping(c) for c in _list(status.get("containerStatuses"))]
    last = [_mapping(_mapping(c.get("lastState")).get("terminated")) for c in containers]
    exit_codes = [t.get("exitCode") for t in last if isinstance(t.get("exitCode"), int)]
    return Replica(
        id=name,
        generation=_int(labels.get(GENERATION_LABEL)),
        image_id=_uuid_text(labels.get(IMAGE_LABEL)),
        address=None,
        alive=alive,
        ready=alive and ready,
        exit_code=exit_codes[0] if exit_codes else None,
        oom_killed=any(t.get("reason") == "OOMKilled" for t in last),
        restarts=sum(_int(c.get("restartCount")) for c in containers),
        created=_timestamp(metadata.get("creationTimestamp")),
    )


def _uuid_text(value: object) -> str | None:
    """An image id from a label, if it is one (a roll back writes it to the service's row)."""
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _timestamp(value: object) -> float:
    if not isinstance(value, str):
        return 0.0
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return 0.0
