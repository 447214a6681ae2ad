"""Build scoring images with the Docker engine and push them to a registry, or, on the
embedded default, export them into the service's own image store (``workers.image_import``).

Uses the low-level streaming API so every engine line reaches the build log as it comes.
The engine reports a failed build, pull or push inside an HTTP 200 stream (``error`` /
``errorDetail``), so every chunk is checked. Credentials are per job: each pull and push
carries its own ``auth_config``, and builds never carry the host's saved docker logins.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import requests
import urllib3

from app.registry_address import registry_endpoint
from workers.build_context import (
    BuildSpec,
    ContextInfo,
    InvalidBuildSpec,
    check_spec,
    parse_extra_steps,
    write_context,
)
from workers.builders import BuildFailed, BuildResult, Log, address_host, redacting, scrub
from workers.builders.run_limits import RunLimits, RunStepWatch
from workers.fetch_policy import allowing_registry
from workers.fetcher import FetchError, FetchPolicy, Resolver, check_url
from workers.image_import import ImportLimits, ImportRefused, import_archive
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.remote_registry import DIGEST, ImageReference, RemoteRegistryClient, RemoteRegistryError
from workers.scratch import scratch_dir

__all__ = [
    "BASE_DIGEST_LABEL",
    "MAX_TENANT_ANSWER_BYTES",
    "DockerBuilder",
    "EngineAnswerRefused",
    "EngineAnswerTooLarge",
    "EngineLate",
    "EngineRedirected",
    "check_stream",
    "engine_client",
    "explain_build_failure",
    "explain_registry_error",
    "registry_host",
    "set_deadline",
]

logger = logging.getLogger(__name__)

BASE_DIGEST_LABEL = "org.mms.base-image.digest"
SERVICE_NAMESPACE = "mms/"  # the project's prebuilt base images, in the service's registry
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the engine colours a RUN's stderr
_STEP = re.compile(r"^Step (\d+)/\d+ : ")
_PIP_MISSING = re.compile(r"No matching distribution found for (\S+)")
_NONZERO = re.compile(r"The command '.*' returned a non-zero code: (\d+)", re.DOTALL)
_UNREACHABLE_HINTS = (
    "Could not fetch URL",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
)
_TAIL_LINES = 60  # engine output kept to explain a failure
_MAX_REASON = 400
# Progress chatter that would flood the log (one chunk per few KB pushed).
_QUIET_STATUSES = frozenset(
    {
        "Pushing",
        "Downloading",
        "Extracting",
        "Waiting",
        "Preparing",
        "Verifying Checksum",
        "Download complete",
        "Pulling fs layer",
    }
)
_AUTH_HINTS = ("no basic auth credentials", "unauthorized", "authentication required")


# A tenant's engine answers as an attacker may: docker-py reads each answer whole, so each is
# read at most this far (a listing of a large swarm's services or tasks, a log's last lines,
# are far below it: as workers/deploy/kubernetes_driver.py's _MAX_ANSWER_BYTES).
MAX_TENANT_ANSWER_BYTES = 8 * 1024 * 1024
# Of an answer with an error status, whose message is all that is used (it goes into the error).
MAX_TENANT_ERROR_BYTES = 64 * 1024
_READ_CHUNK = 64 * 1024
# docker-py sends some calls (a pull) with no timeout at all: a tenant's engine gets these,
# each read, and every answer whole (a pull's progress on a slow link included) at most this.
TENANT_CONNECT_SECONDS = 30.0
TENANT_READ_SECONDS = 120.0
MAX_TENANT_ANSWER_SECONDS = 600.0


class EngineAnswerRefused(requests.RequestException):
    """A tenant's engine answered what is not read; the message says why, never the body."""


class EngineAnswerTooLarge(EngineAnswerRefused):
    """A tenant's engine answered more than its bound; the message names the bound, never the body."""


class EngineLate(EngineAnswerRefused):
    """A tenant's engine was asked past the deadline its client was given (``engine_client``)."""


class EngineRedirected(EngineAnswerRefused):
    """A tenant's engine answered with a redirect: never followed, as it could send the worker
    anywhere (the host's loopback, a metadata address), past the address that was checked."""


class _TenantEngineAdapter(requests.adapters.HTTPAdapter):
    """The one adapter of a tenant's engine: every answer's body is read at most
    ``MAX_TENANT_ANSWER_BYTES`` (``MAX_TENANT_ERROR_BYTES`` of an error's), checked on
    Content-Length first and counted as it is read (decoded: a compressed answer counts as it
    unpacks); with ``hostname``, the connection goes to the address in the URL and the peer's
    certificate is checked against ``hostname`` (also sent as SNI) instead.

    ``deadline`` (time.monotonic()), when set: all the client's calls end by then. Past it, no
    request is sent, and every connection is shut down (a read blocked on an engine that sends
    a byte now and then returns at once): one pass's calls, however many, take no longer."""

    def __init__(self, hostname: str | None = None) -> None:
        self._hostname = hostname  # before the base class makes its pool manager
        self._deadline: float | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        super().__init__()

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float | None) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._deadline = value
            if value is not None:
                self._timer = threading.Timer(max(0.0, value - time.monotonic()), self._cut)
                self._timer.daemon = True
                self._timer.start()

    def late(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._hostname is not None:
            kwargs.update(server_hostname=self._hostname, assert_hostname=self._hostname)
        super().init_poolmanager(*args, **kwargs)
        adapter = self

        class Connection(urllib3.connection.HTTPSConnection):
            def connect(self) -> None:
                super().connect()
                adapter._opened(self)

        class Pool(urllib3.HTTPSConnectionPool):
            ConnectionCls = Connection

        self.poolmanager.pool_classes_by_scheme = {**self.poolmanager.pool_classes_by_scheme, "https": Pool}

    def _opened(self, connection: Any) -> None:
        with self._lock:
            self._connections = [c for c in self._connections if c.sock is not None]
            self._connections.append(connection)
        if self.late():  # opened as the deadline passed: cut too
            self._cut()

    def _cut(self) -> None:
        """The deadline passed: end every connection's reads and writes (on the timer's thread)."""
        with self._lock:
            sockets = [c.sock for c in self._connections if c.sock is not None]
        for sock in sockets:
            with suppress(OSError):
                # socket.socket's own: on an SSLSocket it leaves the TLS state alone for the
                # reader, which then sees the connection end.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self.deadline = None  # the timer stopped
        super().close()

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:  # never wait on a tenant's engine without a bound
            kwargs["timeout"] = (TENANT_CONNECT_SECONDS, TENANT_READ_SECONDS)
        if self._deadline is not None:  # a connect or handshake that dawdles ends by the deadline too
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise EngineLate("did not finish within its deadline")
            timeout = kwargs["timeout"]
            connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
            kwargs["timeout"] = tuple(left if t is None else min(t, left) for t in (connect, read))
        return super().send(request, *args, **kwargs)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        response = super().build_response(req, resp)
        if response.is_redirect:
            resp.close()
            raise EngineRedirected(f"answered with a redirect ({response.status_code}), which is not followed")
        limit = MAX_TENANT_ANSWER_BYTES if response.status_code < 400 else MAX_TENANT_ERROR_BYTES
        try:
            declared = int(response.headers.get("Content-Length") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            resp.close()  # nothing read: the connection is not reused
            raise EngineAnswerTooLarge(f"answered more than {limit} bytes")
        response.raw = _BoundedBody(resp, limit, deadline=time.monotonic() + MAX_TENANT_ANSWER_SECONDS, late=self.late)
        return response


@dataclass(frozen=True)
class _ChunkState:
    """What docker-py's stream reader asks of a body's connection, and nothing else of it."""

    chunked: bool
    chunk_left: int | None


class _BoundedBody:
    """A response's raw body whose reads raise EngineAnswerTooLarge past ``limit`` bytes, and
    EngineAnswerRefused past ``deadline``. It has only what requests and docker-py's stream
    reader read a body with: no socket to read around it."""

    def __init__(self, raw: Any, limit: int, *, deadline: float, late: Callable[[], bool] = lambda: False) -> None:
        self._raw, self._limit, self._seen, self._deadline, self._late = raw, limit, 0, deadline, late

    @property
    def _fp(self) -> _ChunkState:
        return _ChunkState(bool(self._raw._fp.chunked), self._raw._fp.chunk_left)

    def stream(self, amt: int = _READ_CHUNK, decode_content: bool | None = None) -> Iterator[bytes]:
        for chunk in self._raw.stream(min(amt or _READ_CHUNK, _READ_CHUNK), decode_content=decode_content):
            yield self._counted(chunk)

    def read(self, amt: int | None = None, decode_content: bool | None = None, **_: Any) -> bytes:
        if amt is None:
            return b"".join(self.stream(_READ_CHUNK, decode_content=decode_content))
        return self._counted(self._raw.read(min(amt, self._limit + 1 - self._seen), decode_content=decode_content))

    def _counted(self, chunk: bytes) -> bytes:
        if self._late():
            self._raw.close()
            raise EngineLate("did not finish within its deadline")
        if time.monotonic() > self._deadline:
            self._raw.close()
            raise EngineAnswerRefused(f"did not finish an answer within {MAX_TENANT_ANSWER_SECONDS:.0f} s")
        self._seen += len(chunk)
        if self._seen > self._limit:
            self._raw.close()  # the rest unread: the connection is not reused
            raise EngineAnswerTooLarge(f"answered more than {self._limit} bytes")
        return chunk

    def close(self) -> None:
        self._raw.close()

    def release_conn(self) -> None:
        self._raw.release_conn()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)


class _JobClient(docker.APIClient):
    """An API client that never forwards the host's saved docker logins to a build."""

    def _set_auth_headers(self, headers: dict[str, str]) -> None:
        # docker-py sends every login in ~/.docker/config.json with each build
        # (X-Registry-Config); builds here pull nothing, the base is pulled per job first.
        return None


def engine_client(
    docker_host: str | None,
    timeout: int = 600,
    *,
    tls: docker.tls.TLSConfig | None = None,
    server_hostname: str | None = None,
    deadline: float | None = None,
) -> docker.APIClient:
    """A client for the engine at ``docker_host`` (None: the default local socket); ``tls``: a
    ``tcp://`` engine's CA and client certificate (a tenant's swarm manager); ``server_hostname``:
    the name the engine's certificate is checked against when ``docker_host`` holds the address
    it was resolved to (never looked up again: no second answer to trust); ``deadline`` (a
    tenant's engine: time.monotonic()): when all its calls end (``set_deadline`` moves it)."""
    if tls is None:
        return _JobClient(base_url=docker_host, version="auto", timeout=timeout)
    # requests would let REQUESTS_CA_BUNDLE replace the engine's CA (and the environment's proxy
    # carry the connection): only ``tls`` decides whom this client trusts. So the API version is
    # asked ("auto") only once the environment is out of it.
    client = _JobClient(base_url=docker_host, version="1.41", timeout=timeout, tls=tls)
    client.trust_env = False
    adapter = _TenantEngineAdapter(server_hostname)
    adapter.deadline = deadline
    client.mount("https://", adapter)
    try:
        client._version = client._retrieve_server_version()
    except BaseException:
        client.close()  # the deadline's timer with it
        raise
    return client


def set_deadline(client: docker.APIClient, deadline: float | None) -> None:
    """Move the deadline of a tenant engine's client (``engine_client``); nothing for another's."""
    adapter = client.adapters.get("https://")
    if isinstance(adapter, _TenantEngineAdapter):
        adapter.deadline = deadline


def registry_host(reference: str) -> str:
    """The registry host of an image reference (``docker.io`` when it names none)."""
    first, sep, _ = reference.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first.lower()
    return "docker.io"


class DockerBuilder:
    """Builds with the engine at ``docker_host`` and pushes to ``registry``."""

    def __init__(
        self,
        docker_host: str | None,
        registry: str,
        registry_auth: Mapping[str, str] | None = None,
        *,
        timeout: int = 600,
        policy: FetchPolicy | None = None,
        resolver: Resolver = socket.getaddrinfo,
        network: str | None = None,
        proxy: str | None = None,
        run_limits: RunLimits | None = None,
        store: ImageStoreClient | None = None,
        pull_token: Callable[[str], str] | None = None,
    ) -> None:
        self.docker_host = docker_host
        # The embedded default: no registry; the image is exported from the engine into the
        # service's own ``store`` (``registry`` is its address), and the engine pulls a base
        # from its /v2/ with a ``pull_token`` for that one repository.
        if store is not None and pull_token is None:
            raise ValueError("a docker builder on the service's own store needs a pull token maker")
        self.store, self._pull_token = store, pull_token
        self.registry = registry.rstrip("/")  # host[:port][/prefix]
        self._registry_auth = dict(registry_auth) if registry_auth else None
        self.timeout = timeout  # longest silence tolerated from the engine, in seconds
        self.run_limits = run_limits or RunLimits()  # RUN steps' memory, processes, disk, time
        # Which registries a base image may come from (its own registry always); None: no
        # address rules (a caller that picks the bases).
        self.policy = allowing_registry(policy, self.registry) if policy is not None else None
        self._resolver = resolver
        # RUN steps are tenants' code: they run in ``network`` (MMS_BUILD_NETWORK), where the
        # only destination is the egress proxy for the package indexes (``proxy``), or with
        # no network at all. Never the host's: it reaches the engine's API and every
        # loopback service (scripts/infra/build-network.sh and its README, "Build network").
        if network in ("host", "bridge", "default") or (network or "").startswith("container:"):
            raise ValueError(f"a build's RUN steps may not run in the {network!r} network")
        self.network = network or "none"
        if self.network == "none":
            logger.warning(
                "build.no_network",
                extra={"detail": "MMS_BUILD_NETWORK is not set: RUN steps (pip installs included) have no network"},
            )
        # Docker's predefined proxy build arguments: every RUN sees them, and the engine keeps
        # them out of the image's history and config. An empty NO_PROXY: nothing bypasses it.
        self.build_args = (
            {
                **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
                "NO_PROXY": "",
                "no_proxy": "",
            }
            if proxy and self.network != "none"
            else {}
        )

    def build_and_push(self, spec: BuildSpec, image_repo: str, tag: str, log: Log) -> BuildResult:
        """Build ``spec``, push it as ``<registry>/<image_repo>:<tag>``, return the result."""
        secrets = [
            s
            for s in (
                spec.base_registry and spec.base_registry.password,
                self._registry_auth and self._registry_auth.get("password"),
            )
            if s
        ]
        emit = redacting(log, secrets)
        image = f"{self.registry}/{image_repo}"
        started = time.monotonic()
        try:
            with _engine_errors("engine"):
                api = engine_client(self.docker_host, self.timeout)
            with api, scratch_dir("docker") as tmp:
                with _engine_errors("context"):  # refuse bad inputs before pulling anything
                    check_spec(spec)
                    parse_extra_steps(spec.extra_dockerfile_steps or "")
                pulled, base_digest = self._pull_base(api, spec, image_repo, emit)
                if base_digest:
                    # FROM the digest just pulled with this job's credentials, never a tag
                    # that another build could make the engine's cache answer for.
                    repo = docker.utils.parse_repository_tag(pulled)[0]
                    spec = replace(spec, base_image=f"{repo}@{base_digest}")
                with _engine_errors("context"):
                    info = write_context(spec, Path(tmp) / "context.tar")
                image_id = self._build(
                    api,
                    Path(tmp) / "context.tar",
                    info,
                    f"{image}:{tag}",
                    spec.base_image if base_digest else pulled,
                    {BASE_DIGEST_LABEL: base_digest} if base_digest else {},
                    emit,
                )
                if self.store is not None:
                    digest = self._store_image(api, image_id, image_repo, tag, emit)
                else:
                    digest = self._push(api, image, tag, emit)
                with _engine_errors("push"):
                    size = int(api.inspect_image(image_id)["Size"])
        except BuildFailed as exc:
            message = scrub(exc.message, secrets)
            emit(f"mms: build failed at step {exc.step}: {message}")
            logger.warning("build.failed", extra={"image": f"{image}:{tag}", "step": exc.step})
            raise BuildFailed(exc.step, message) from None
        elapsed = time.monotonic() - started
        emit(f"mms: done in {elapsed:.1f} s: {image}:{tag} {digest} ({size} bytes)")
        logger.info(
            "build.succeeded", extra={"image": f"{image}:{tag}", "digest": digest, "seconds": round(elapsed, 1)}
        )
        return BuildResult(f"{image}:{tag}", digest, size, base_digest)

    def _pull_base(self, api: docker.APIClient, spec: BuildSpec, image_repo: str, emit: Log) -> tuple[str, str | None]:
        """Pull the base image; return what the engine pulled and its digest. Its registry
        must be one the policy lets a build reach.

        The engine only ever pulls from the service's own registry. A base anywhere else is
        first copied there by the worker (``_mirror_base``), through a registry client that
        pins and checks every connection (token realm and blob redirects included), since
        the engine would resolve the name again on the host network and follow whatever
        the registry sends it.
        """
        # Pulled on every build, anonymously if no credentials are given: the registry
        # re-authorises each job, so one tenant's privately pulled base cached in the
        # engine never serves another tenant's build (a plain FROM would use the cache).
        ref, host = spec.base_image, registry_host(spec.base_image)
        if self.policy is not None:
            # The engine also takes a first part with a capital letter as a registry
            # ("Localhost/x"), which registry_host() reads as Docker Hub.
            first, sep, _ = ref.partition("/")
            pulled_from = first if sep and first != first.lower() else host
            name = "registry-1.docker.io" if pulled_from == "docker.io" else pulled_from.lower()
            try:
                check_url(f"https://{name}/v2/", policy=self.policy, resolver=self._resolver)
            except FetchError as exc:
                if exc.reason == "blocked_address":  # never the private address itself
                    raise BuildFailed(
                        "pull-base",
                        f"base image registry {pulled_from} is at a "
                        "private address; ask the operator to allow it "
                        "(MMS_FETCH_ALLOW_HOSTS)",
                    ) from None
                raise BuildFailed("pull-base", f"base image registry {pulled_from}: {exc}") from None
        auth: dict[str, str] = {}  # empty, not None: docker-py would use saved logins
        if registry_endpoint(host) != registry_endpoint(self.registry.partition("/")[0]):
            engine = api.version()  # the engine's own platform, as its pull would choose
            ref = self._mirror_base(
                spec, image_repo, (engine.get("Os") or "linux", engine.get("Arch") or "amd64"), emit
            )
            auth = self._auth_config(image_repo)  # a repository of this build's own, picked here
        elif self.store is not None:
            auth = self._own_store_pull(ref, image_repo)
        elif spec.base_registry is not None:
            given = address_host(spec.base_registry.address)
            if given != host:
                raise BuildFailed(
                    "pull-base", f"the base image registry credentials are for {given}, but the base image is on {host}"
                )
            auth = spec.base_registry.auth_config()
        elif self._registry_auth and ref.startswith(f"{self.registry}/{SERVICE_NAMESPACE}"):
            # The service's own prebuilt bases only: its login must not let a build read
            # other images in its registry (other tenants' builds live there too).
            auth = self._auth_config()
        emit(f"mms: pulling base image {ref}" + (" with credentials" if auth else ""))
        with _engine_errors("pull-base", host, bool(auth)):
            chunks = api.pull(ref, stream=True, decode=True, auth_config=auth)
            check_stream("pull-base", chunks, emit, host, bool(auth))
            details = api.inspect_image(ref)
        triggers = (details.get("Config") or {}).get("OnBuild") or []
        if triggers:
            # They would run in this build, where a COPY --from reads any image in the engine.
            raise BuildFailed(
                "pull-base",
                f"the base image has ONBUILD instructions "
                f"({_one_line('; '.join(triggers))[:200]}), which would run in "
                "this build: build on an image without them",
            )
        volumes = sorted((details.get("Config") or {}).get("Volumes") or {})
        if volumes:
            # Each step's container and the smoke test's would get a volume there, which
            # neither the image nor the disk limit counts.
            raise BuildFailed(
                "pull-base",
                f"the base image declares volumes "
                f"({_one_line(', '.join(volumes))[:200]}), whose writes would "
                "escape the build's disk limit: build on an image without VOLUME",
            )
        repo = docker.utils.parse_repository_tag(ref)[0]
        digests = [d.split("@", 1)[1] for d in details.get("RepoDigests") or [] if d.split("@", 1)[0] == repo] or [None]
        return ref, digests[0]

    def _mirror_base(self, spec: BuildSpec, image_repo: str, platform: tuple[str, str], emit: Log) -> str:
        """Copy the base image into this build's repository of the service's registry, by
        digest (no tag), and return the reference the engine pulls it by.

        The copy is the same manifest bytes, so the digest (and the base digest label) is
        the source's; the build's push then finds the base's layers already there.
        """
        try:
            ref = ImageReference.parse(spec.base_image)
        except ValueError as exc:
            raise BuildFailed("pull-base", str(exc)) from None
        login: dict[str, str] = {}
        if spec.base_registry is not None:
            given = address_host(spec.base_registry.address)
            if given != address_host(ref.host):
                raise BuildFailed(
                    "pull-base",
                    f"the base image registry credentials are for {given}, but the base image is on {ref.host}",
                )
            login = {"username": spec.base_registry.username, "password": spec.base_registry.password}
        own_host, _, prefix = self.registry.partition("/")
        own_repo = f"{prefix}/{image_repo}" if prefix else image_repo
        service = self._registry_auth or {}
        emit(
            f"mms: copying base image {spec.base_image} into the service's registry"
            + (" with credentials" if login else "")
        )
        started, copied = time.monotonic(), 0
        try:
            with (
                RemoteRegistryClient(
                    ref.host,
                    login.get("username"),
                    login.get("password"),
                    timeout=self.timeout,
                    policy=self.policy,
                    resolver=self._resolver,
                ) as source,
                self.store
                or RemoteRegistryClient(
                    own_host, service.get("username"), service.get("password"), timeout=self.timeout
                ) as own,
            ):
                manifest = source.get_manifest(ref.repository, ref.reference, platform=platform)
                for blob in [manifest.body["config"], *manifest.body.get("layers", [])]:
                    if blob.get("urls"):
                        raise BuildFailed(
                            "pull-base",
                            "the base image has layers stored "
                            "outside its registry (foreign layers): build on "
                            "a Linux image without them",
                        )
                    # The tenant's registry wrote these: a digest goes into URLs sent to our
                    # registry with the service's login, so it must be exactly a digest.
                    digest, size = blob["digest"], blob["size"]
                    if not (
                        isinstance(digest, str) and DIGEST.fullmatch(digest) and isinstance(size, int) and 0 <= size
                    ):
                        raise BuildFailed(
                            "pull-base",
                            f"the base image {spec.base_image} has a layer whose digest or size is not valid",
                        )
                    how = own.push_blob(own_repo, digest, size, _blob_copier(source, ref.repository, digest))
                    copied += size if how == "uploaded" else 0
                # The store tags what it holds; a registry takes the manifest by its digest.
                held_as = f"base-{manifest.digest[7:23]}" if self.store is not None else manifest.digest
                own.put_manifest(own_repo, held_as, manifest.raw, manifest.media_type)
        except RemoteRegistryError as exc:
            raise BuildFailed("pull-base", str(exc)) from None
        except (KeyError, TypeError, ValueError):
            raise BuildFailed(
                "pull-base", f"the base image {spec.base_image} has a manifest without a config or layers"
            ) from None
        emit(f"mms: base image {manifest.digest} copied ({copied} bytes new) in {time.monotonic() - started:.1f} s")
        return f"{self.registry}/{image_repo}@{manifest.digest}"

    def _build(
        self,
        api: docker.APIClient,
        context: Path,
        info: ContextInfo,
        target: str,
        base: str,
        labels: dict[str, str],
        emit: Log,
    ) -> str:
        emit(f"mms: building {target} from this Dockerfile:")
        for line in info.dockerfile.splitlines():
            emit(f"    {line}")
        step, image_id, failure = info.steps[0], None, None
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        started = time.monotonic()
        watch = RunStepWatch(lambda: engine_client(self.docker_host, 30), self.run_limits)
        with _engine_errors("build"), context.open("rb") as fileobj, watch:
            stream = api.build(
                fileobj=fileobj,
                custom_context=True,
                tag=target,
                decode=True,
                network_mode=self.network,
                buildargs=self.build_args or None,
                container_limits=self.run_limits.build_api_limits(),
                shmsize=watch.shm_marker,
                pull=False,
                rm=True,
                forcerm=True,
                labels=labels or None,
                timeout=self.timeout,
            )
            for line, chunk in _lines(stream):
                if line is not None:
                    emit(line)
                    tail.append(line)
                    watch.saw(line)
                    match = _STEP.match(line)
                    if match:  # labels= adds one instruction past the generated ones
                        step = info.steps[min(int(match[1]), len(info.steps)) - 1]
                    continue
                aux = chunk.get("aux")
                if isinstance(aux, dict) and aux.get("ID"):
                    image_id = aux["ID"]
                # Keep reading after an error: the stream ends right after, and an
                # abandoned response would leak its connection.
                failure = failure or _chunk_error(chunk)
        if failure:
            code = _NONZERO.search(failure)
            raise BuildFailed(
                step, watch.failure_reason(int(code[1]) if code else None) or explain_build_failure(failure, tail)
            )
        if not image_id:
            raise BuildFailed(step, "the engine finished without reporting an image")
        with _engine_errors("build"):
            watch.check_image(api, image_id, base, context.stat().st_size)
        if watch.breach:
            with suppress(docker.errors.APIError):
                api.remove_image(image_id, force=True)
            raise BuildFailed(
                next((name for name in reversed(info.steps) if name.startswith("extra-steps")), step), watch.breach
            )
        emit(f"mms: built {image_id} in {time.monotonic() - started:.1f} s")
        return image_id

    def _push(self, api: docker.APIClient, image: str, tag: str, emit: Log) -> str:
        host, auth = registry_host(f"{image}:{tag}"), self._auth_config()
        emit(f"mms: pushing {image}:{tag}")
        started = time.monotonic()
        with _engine_errors("push", host, bool(auth)):
            chunks = api.push(image, tag=tag, stream=True, decode=True, auth_config=auth)
            digest = check_stream("push", chunks, emit, host, bool(auth)).get("Digest")
        if not digest:
            raise BuildFailed("push", f"registry {host} reported no digest for the pushed image")
        emit(f"mms: pushed {image}:{tag} {digest} in {time.monotonic() - started:.1f} s")
        return digest

    def _own_store_pull(self, ref: str, image_repo: str) -> dict[str, str]:
        """The engine's login for a base in the service's own store: a token for its one
        repository, which must be a published base (``mms/``) or this build's account's."""
        try:
            repository = ImageReference.parse(ref).repository
        except ValueError as exc:
            raise BuildFailed("pull-base", str(exc)) from None
        account = image_repo.split("/", 1)[0]
        if not repository.startswith((SERVICE_NAMESPACE, f"{account}/")):
            raise BuildFailed(
                "pull-base",
                f"the base image {ref} is neither a published base image (mms/) nor one of this account's images",
            )
        return {"registrytoken": self._pull_token(repository)}

    def _store_image(self, api: docker.APIClient, image_id: str, image_repo: str, tag: str, emit: Log) -> str:
        """Export the built image from the engine (``docker save``) into the service's store."""
        emit(f"mms: storing {self.registry}/{image_repo}:{tag} in the service's image store")
        started = time.monotonic()
        with scratch_dir("docker-export") as tmp:
            archive = Path(tmp) / "image.tar"
            with _engine_errors("push"), archive.open("wb") as out:
                for chunk in api.get_image(image_id, chunk_size=1 << 20):
                    out.write(chunk)
            try:
                # The engine's own export: an older engine links a layer that appears twice.
                done = import_archive(
                    self.store, self.registry, archive, image_repo, tag, emit, limits=ImportLimits(internal_links=True)
                )
            except (ImportRefused, RemoteRegistryError) as exc:
                raise BuildFailed("push", str(exc)) from None
        emit(f"mms: stored {self.registry}/{image_repo}:{tag} {done.digest} in {time.monotonic() - started:.1f} s")
        return done.digest

    def _auth_config(self, repository: str | None = None) -> dict[str, str]:
        if self.store is not None and repository is not None:
            return {"registrytoken": self._pull_token(repository)}
        if not self._registry_auth:
            return {}
        return {
            "username": self._registry_auth["username"],
            "password": self._registry_auth["password"],
            "serveraddress": registry_host(f"{self.registry}/x"),
        }


def _blob_copier(source: RemoteRegistryClient, repository: str, digest: str) -> Callable[[], Iterator[bytes]]:
    """The blob's bytes streamed from ``source``, opened afresh on each call (an upload is
    retried after the registry asks for credentials); the receiving registry checks the
    digest."""

    def body() -> Iterator[bytes]:
        # Opened once per attempt: the push that reads it retries (attempts do not multiply).
        with source.open_blob(repository, digest, retry=False) as chunks:
            yield from chunks

    return body


def explain_build_failure(error: str, tail: Iterable[str]) -> str:
    """A one-line reason for a failed build from the engine's error and its last lines."""
    lines = [line.strip() for line in tail if line.strip()]
    for line in reversed(lines):
        if line.startswith("mms: "):  # our own checks (conda, python version) say it best
            return _one_line(line[5:])
    missing = next((m[1] for m in map(_PIP_MISSING.search, reversed(lines)) if m), None)
    wanted = f" (looking for {missing})" if missing else ""
    # pip says "no matching distribution" when it could not ask the index at all.
    if any("CERTIFICATE_VERIFY_FAILED" in line for line in lines):
        return (
            "pip could not verify the package index's TLS certificate; configure the "
            f"proxy's CA bundle for builds{wanted}"
        )
    if any(hint in line for line in lines for hint in _UNREACHABLE_HINTS):
        return f"pip could not reach the package index{wanted}"
    if missing:
        return f"pip found no distribution for {missing} (check its name and version)"
    for line in reversed(lines):
        if line.startswith("ERROR: "):
            return _one_line(line[7:])
    match = _NONZERO.search(error)
    if match:
        output = [x for x in lines if not x.startswith(("Step ", "--->", "Removing "))]
        last = f": {output[-1]}" if output else ""
        return _one_line(f"a command exited with code {match[1]}{last}")
    return _one_line(error)


def explain_registry_error(error: str, host: str, had_auth: bool) -> str:
    """A one-line reason for a failed pull or push, saying when authentication is the cause."""
    if any(hint in error.lower() for hint in _AUTH_HINTS):
        if had_auth:
            return f"registry {host} refused the credentials (authentication required)"
        return f"registry {host} requires authentication, and no credentials were given for it"
    return _one_line(error)


def check_stream(step: str, chunks: Iterator[dict[str, Any]], emit: Log, host: str, had_auth: bool) -> dict[str, Any]:
    """Log a pull or push stream; raise on an error chunk; return the last ``aux``."""
    aux: dict[str, Any] = {}
    failure = None
    for chunk in chunks:
        failure = failure or _chunk_error(chunk)
        if isinstance(chunk.get("aux"), dict):
            aux = chunk["aux"]
        status = chunk.get("status")
        if status and status not in _QUIET_STATUSES:
            emit(f"{chunk['id']}: {status}" if chunk.get("id") else status)
    if failure:
        raise BuildFailed(step, explain_registry_error(failure, host, had_auth))
    return aux


def _lines(chunks: Iterable[dict[str, Any]]) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """Split ``stream`` texts into whole lines; yield (line, chunk) or (None, chunk)."""
    pending = ""
    for chunk in chunks:
        text = chunk.get("stream")
        if not isinstance(text, str):
            yield None, chunk
            continue
        pending += text
        *complete, pending = pending.split("\n")
        for line in complete:
            line = _ANSI.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])  # as a terminal shows
            if line.strip():
                yield line, chunk
    if pending.strip():
        yield pending, {}


def _chunk_error(chunk: dict[str, Any]) -> str | None:
    if "error" not in chunk and "errorDetail" not in chunk:
        return None
    detail = chunk.get("errorDetail")
    message = chunk.get("error") or (detail.get("message") if isinstance(detail, dict) else None)
    return str(message or detail or "unknown error")


@contextmanager
def _engine_errors(step: str, host: str = "", had_auth: bool = False) -> Iterator[None]:
    """Turn engine, connection and spec errors into ``BuildFailed(step, ...)``."""
    try:
        yield
    except InvalidBuildSpec as exc:
        raise BuildFailed(step, str(exc)) from None
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        reason = explain_registry_error(text, host, had_auth) if host else _one_line(text)
        raise BuildFailed(step, reason) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise BuildFailed(step, _one_line(f"Docker engine error: {exc}")) from None
    except OSError as exc:  # after RequestException, which is an OSError too
        raise BuildFailed(step, _one_line(f"cannot read the build inputs: {exc}")) from None


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 1] + "…"
