"""A fake Kubernetes API server on loopback, for the kubernetes driver's tests: no cluster can
run on this machine (no kube-apiserver in PyPI, npm or Debian bookworm), so the driver is tested
against this, never a live cluster.

It serves HTTPS with a throwaway CA (the kubeconfig's ``certificate-authority-data``), takes the
kubeconfig's bearer token only, and implements just what the driver uses: server-side apply
(``PATCH`` with ``application/apply-patch+yaml``, ``fieldManager=mms``, ``force=true``), get,
list by label selector, delete, and pod logs, on namespaced paths only. Every request's shape is
checked and every applied object is validated against the Kubernetes 1.37 schema, strictly
(kubernetes_validate): a fault is answered as the API server would (a 4xx Status) and kept in
``violations``, which the tests assert empty. The test sets what the controllers would
(pods, a Deployment's status) with the helpers at the end.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SCHEMA_VERSION = "1.37"
HOST_NAME = "kube.test"  # in the certificate too: for a server named, not written as an address
# (group path, resource) -> (kind, apiVersion)
RESOURCES = {
    ("api/v1", "secrets"): ("Secret", "v1"),
    ("api/v1", "services"): ("Service", "v1"),
    ("api/v1", "pods"): ("Pod", "v1"),
    ("apis/apps/v1", "deployments"): ("Deployment", "apps/v1"),
    ("apis/networking.k8s.io/v1", "networkpolicies"): ("NetworkPolicy", "networking.k8s.io/v1"),
    ("apis/autoscaling/v2", "horizontalpodautoscalers"): ("HorizontalPodAutoscaler", "autoscaling/v2"),
}
_PATH = re.compile(
    r"^/(api/v1|apis/apps/v1|apis/networking\.k8s\.io/v1|apis/autoscaling/v2)"
    r"/namespaces/([a-z0-9-]+)/([a-z]+)(?:/([A-Za-z0-9.-]+))?(/log)?$"
)


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str | None
    authorization: str | None
    body: bytes = b""


@dataclass
class FakeKubeApi:
    token: str
    tls_dir: Path
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (resource, ns, name)
    logs: dict[str, list[str]] = field(default_factory=dict)  # pod -> "<RFC 3339> text" lines
    previous_logs: dict[str, list[str]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    redirect_to: str | None = None  # answer every request with a redirect there
    echo_credentials: bool = False  # a hostile server: its 401 says what it was sent
    collect_pods: bool = True  # a Deployment's delete takes its pods at once (else: they terminate)
    honour_tail: bool = True  # a log's tailLines (a hostile server sends every line it has)
    # A hostile server: answers every request itself, writing what it likes to the connection.
    hostile: Callable[[BaseHTTPRequestHandler], None] | None = None
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _port: int = 0
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _next_ip: int = 17

    # -- serving ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def ca_data(self) -> str:
        return base64.b64encode((self.tls_dir / "ca.pem").read_bytes()).decode()

    def kubeconfig(self, *, server: str | None = None, token: str | None = None, namespace: str = "tenant-a") -> str:
        return (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {server or self.url}\n"
            f"    certificate-authority-data: {self.ca_data}\n"
            f"users:\n- name: deployer\n  user:\n    token: {token or self.token}\n"
            f"contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: deployer\n    namespace: {namespace}\n"
            "current-context: fake\n"
        )

    def start(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls_dir / "leaf.pem", self.tls_dir / "key.pem")
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

        server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        server.daemon_threads = True
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop answering (the port refuses connections); ``start`` serves on it again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = None

    # -- the API ---------------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        seen = Seen(
            method, parts.path, query, handler.headers.get("Content-Type"), handler.headers.get("Authorization"), body
        )
        if self.hostile is not None:
            with self._lock:
                self.seen.append(seen)
            self.hostile(handler)
            return
        with self._lock:
            self.seen.append(seen)
            try:
                status, answer, content_type = self._answer(seen)
            except Exception as exc:  # noqa: BLE001  # a fault of the fake's: the test fails on it
                self.violations.append(f"the fake failed on {seen.method} {seen.path}: {exc!r}")
                status, answer, content_type = _status(500, "InternalError", "the fake failed")
        if self.redirect_to is not None:
            status, answer, content_type = 302, b"", "text/plain"
        handler.send_response(status)
        if self.redirect_to is not None:
            handler.send_header("Location", self.redirect_to)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer)

    def _answer(self, seen: Seen) -> tuple[int, bytes, str]:
        if seen.authorization != f"Bearer {self.token}":
            return _status(401, "Unauthorized", f"Unauthorized: {seen.authorization}" if self.echo_credentials else "")
        match = _PATH.match(seen.path)
        if match is None or (match.group(1), match.group(3)) not in RESOURCES:
            self.violations.append(f"unexpected request {seen.method} {seen.path}")
            return _status(404, "NotFound", f"the server could not find the requested resource ({seen.path})")
        group, namespace, resource, name, log = match.groups()
        kind, api_version = RESOURCES[(group, resource)]
        key = (resource, namespace, name or "")
        if log:
            if seen.method != "GET" or resource != "pods" or not name:
                self.violations.append(f"unexpected request {seen.method} {seen.path}")
                return _status(405, "MethodNotAllowed", "the server does not allow this method")
            return self._log(seen, namespace, name)
        if seen.method == "PATCH" and name:
            return self._apply(seen, kind, api_version, key)
        if seen.method == "GET" and name:
            found = self.objects.get(key)
            if found is None:
                return _status(404, "NotFound", f'{resource} "{name}" not found')
            return _json(200, found)
        if seen.method == "GET":
            selector = (seen.query.get("labelSelector") or [""])[0]
            if not selector:
                self.violations.append(f"a list of {resource} without a label selector")
            wanted = _selector(selector)
            items = [
                copy.deepcopy(obj)
                for (r, ns, _), obj in sorted(self.objects.items())
                if r == resource and ns == namespace and wanted.items() <= _labels(obj).items()
            ]
            return _json(200, {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": items})
        if seen.method == "DELETE" and name:
            found = self.objects.pop(key, None)
            if found is None:
                return _status(404, "NotFound", f'{resource} "{name}" not found')
            if resource == "deployments" and self.collect_pods:  # the garbage collector: its pods go too
                selector = found["spec"]["selector"]["matchLabels"]
                for other in [k for k, o in self.objects.items() if k[0] == "pods" and k[1] == namespace]:
                    if selector.items() <= _labels(self.objects[other]).items():
                        del self.objects[other]
            return _json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        self.violations.append(f"unexpected request {seen.method} {seen.path}")
        return _status(405, "MethodNotAllowed", "the server does not allow this method")

    def _apply(self, seen: Seen, kind: str, api_version: str, key: tuple[str, str, str]) -> tuple[int, bytes, str]:
        resource, namespace, name = key
        problems = []
        if seen.content_type != "application/apply-patch+yaml":
            problems.append(f"apply of {name} with Content-Type {seen.content_type}")
        if seen.query.get("fieldManager") != ["mms"]:
            problems.append(f"apply of {name} with fieldManager {seen.query.get('fieldManager')}")
        if not _flag(seen.query, "force"):
            problems.append(f"apply of {name} without force=true")
        try:
            body = yaml.safe_load(seen.body)
        except yaml.YAMLError:
            body = None
        if not isinstance(body, dict):
            problems.append(f"apply of {name}: the body is not a YAML mapping")
            body = {}
        metadata = body.get("metadata") or {}
        if (body.get("kind"), body.get("apiVersion")) != (kind, api_version):
            problems.append(f"apply of {name}: {body.get('kind')}/{body.get('apiVersion')} at the path of a {kind}")
        if (metadata.get("name"), metadata.get("namespace")) != (name, namespace):
            problems.append(f"apply of {name}: the body names {metadata.get('namespace')}/{metadata.get('name')}")
        try:
            kubernetes_validate.validate(body, SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"apply of {name}: {exc}")
        if problems:
            self.violations += problems
            return _status(422, "Invalid", "; ".join(problems))
        existing = self.objects.get(key)
        stored = copy.deepcopy(body)
        stored["metadata"]["uid"] = (existing or {}).get("metadata", {}).get("uid") or f"uid-{name}"
        generation = (existing or {}).get("metadata", {}).get("generation", 0)
        if existing is None or existing.get("spec") != self._spec_as_applied(resource, body, existing):
            generation += 1
        stored["metadata"]["generation"] = generation
        # The apply's manager owns what it sent; force=true takes the fields another manager had
        # changed back from it (here: that manager's entry goes, as if it changed only those).
        stored["metadata"]["managedFields"] = [
            {
                "manager": "mms",
                "operation": "Apply",
                "apiVersion": api_version,
                "fieldsType": "FieldsV1",
                "fieldsV1": {f"f:{key}": {} for key in body if key not in ("apiVersion", "kind")},
            }
        ]
        if resource == "deployments":
            # Server-side apply: a count no manager applies is kept (the HPA's), 1 at first.
            stored["spec"].setdefault("replicas", (existing or {}).get("spec", {}).get("replicas", 1))
        if resource == "services":
            stored["spec"]["clusterIP"] = (existing or {}).get("spec", {}).get("clusterIP") or self._cluster_ip()
        if existing is not None and "status" in existing:
            stored["status"] = existing["status"]
        self.objects[key] = stored
        return _json(200 if existing else 201, stored)

    def _spec_as_applied(self, resource: str, body: dict[str, Any], existing: dict[str, Any] | None) -> Any:
        spec = copy.deepcopy(body.get("spec"))
        if existing is not None and isinstance(spec, dict):
            for kept in ("replicas", "clusterIP"):
                if kept in existing.get("spec", {}):
                    spec.setdefault(kept, existing["spec"][kept])
        return spec

    def _cluster_ip(self) -> str:
        self._next_ip += 1
        return f"10.96.0.{self._next_ip}"

    def _log(self, seen: Seen, namespace: str, name: str) -> tuple[int, bytes, str]:
        if ("pods", namespace, name) not in self.objects:
            return _status(404, "NotFound", f'pods "{name}" not found')
        if seen.query.get("container") != ["scoring"]:
            self.violations.append(f"log of {name} for container {seen.query.get('container')}")
        previous = _flag(seen.query, "previous")
        lines = (self.previous_logs if previous else self.logs).get(name)
        if lines is None:
            reason = "previous terminated container" if previous else "container"
            return _status(400, "BadRequest", f'{reason} "scoring" in pod "{name}" not found')
        if not _flag(seen.query, "timestamps"):
            lines = [line.partition(" ")[2] for line in lines]
        tail = seen.query.get("tailLines")
        if tail and self.honour_tail:
            lines = lines[-int(tail[0]) :]
        return 200, "".join(f"{line}\n" for line in lines).encode(), "text/plain"

    # -- what the controllers would do: the tests set it --------------------------------------

    def stored(self, resource: str, name: str | None = None, namespace: str = "tenant-a") -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(o)
                for (r, ns, n), o in self.objects.items()
                if r == resource and ns == namespace and (name is None or n == name)
            ]

    def deployment(self, namespace: str = "tenant-a") -> dict[str, Any]:
        [found] = self.stored("deployments", namespace=namespace)
        return found

    def run_pods(
        self,
        count: int,
        *,
        ready: bool = True,
        waiting: str | None = None,
        restarts: int = 0,
        exit_code: int | None = None,
        namespace: str = "tenant-a",
        replace: bool = True,
    ) -> list[str]:
        """``count`` pods of the Deployment's current template (the old ones go unless not
        ``replace``); the Deployment's status follows. Their names."""
        with self._lock:
            deployment = self.deployment(namespace)
            template = deployment["spec"]["template"]
            labels = template["metadata"]["labels"]
            generation = labels["org.mms.generation"]
            if replace:
                for key in [k for k in self.objects if k[0] == "pods" and k[1] == namespace]:
                    del self.objects[key]
            names = []
            for index in range(count):
                name = f"{deployment['metadata']['name']}-g{generation}x-{index}{len(self.objects)}"
                container: dict[str, Any] = {
                    "name": "scoring",
                    "image": template["spec"]["containers"][0]["image"],
                    "imageID": "",
                    "ready": ready,
                    "restartCount": restarts,
                    "state": {"waiting": {"reason": waiting, "message": f"{waiting}: back-off"}}
                    if waiting
                    else {"running": {"startedAt": _now()}},
                }
                if exit_code is not None:
                    container["lastState"] = {"terminated": {"exitCode": exit_code, "reason": "Error"}}
                self.objects[("pods", namespace, name)] = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": name,
                        "namespace": namespace,
                        "labels": dict(labels),
                        "creationTimestamp": _now(),
                    },
                    "spec": copy.deepcopy(template["spec"]),
                    "status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                        "containerStatuses": [container],
                    },
                }
                names.append(name)
            pods = self.stored("pods", namespace=namespace)
            current = [p for p in pods if p["metadata"]["labels"]["org.mms.generation"] == generation]
            ready_pods = [p for p in pods if p["status"]["conditions"][0]["status"] == "True"]
            self.set_status(
                namespace=namespace,
                replicas=len(pods),
                updatedReplicas=len(current),
                readyReplicas=len(ready_pods),
                availableReplicas=len(ready_pods),
                observedGeneration=deployment["metadata"]["generation"],
            )
            return names

    def edit(
        self,
        resource: str,
        change: Callable[[dict[str, Any]], None],
        *,
        manager: str = "kubectl-edit",
        fields: tuple[str, ...] = ("f:spec",),
        subresource: str | None = None,
        namespace: str = "tenant-a",
    ) -> None:
        """Someone else's update of the one object of ``resource``: ``change`` made to it, and
        the fields it touched owned by ``manager`` (as ``kubectl edit`` or a controller would)."""
        with self._lock:
            [key] = [k for k in self.objects if k[0] == resource and k[1] == namespace]
            obj = self.objects[key]
            change(obj)
            entry: dict[str, Any] = {
                "manager": manager,
                "operation": "Update",
                "apiVersion": obj["apiVersion"],
                "fieldsType": "FieldsV1",
                "fieldsV1": {field: {} for field in fields},
            }
            if subresource:
                entry["subresource"] = subresource
            obj["metadata"].setdefault("managedFields", []).append(entry)
            if "f:spec" in fields and not subresource:
                obj["metadata"]["generation"] = obj["metadata"].get("generation", 0) + 1

    def set_status(self, *, namespace: str = "tenant-a", conditions: list | None = None, **counts: int) -> None:
        with self._lock:
            name = self.deployment(namespace)["metadata"]["name"]
            status = self.objects[("deployments", namespace, name)].setdefault("status", {})
            status.update(counts)
            if conditions is not None:
                status["conditions"] = conditions


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """A boolean query parameter, parsed as the API server does (Go's strconv.ParseBool: the
    Python client sends "True")."""
    return (query.get(name) or [""])[0] in ("1", "t", "T", "true", "True", "TRUE")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _selector(text: str) -> dict[str, str]:
    return dict(term.split("=", 1) for term in text.split(",") if "=" in term)


def _json(status: int, body: Any) -> tuple[int, bytes, str]:
    return status, json.dumps(body).encode(), "application/json"


def _status(code: int, reason: str, message: str) -> tuple[int, bytes, str]:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason}
    return _json(code, body | {"code": code})


def make_tls(directory: Path) -> Path:
    """A throwaway CA and a certificate for 127.0.0.1 and ``HOST_NAME``, signed by it."""
    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake kube CA")])

    def builder(subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=2))
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), key.public_key())
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(HOST_NAME)]),
            False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory


@contextmanager
def fake_kube_api(directory: Path, token: str) -> Iterator[FakeKubeApi]:
    fake = FakeKubeApi(token=token, tls_dir=make_tls(directory))
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
