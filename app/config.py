"""The service's one settings object, read from the environment (prefix ``MMS_``).

Nothing else in the code base reads ``os.environ``: everything comes from here.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app import names
from app.private_files import private_dir, write_new_private_file

# Values that mean "nobody set this": refused outside development.
_PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "please-change", "xxx", "mms"}
_MIN_SECRET_LENGTH = 32


class TrustedIssuer(BaseModel):
    """An external OpenID/AAD-style token issuer whose RS256 keys come from a JWKS URL."""

    issuer: str
    jwks_uri: str
    audience: str | None = None  # None: the service's own audience


class Settings(BaseSettings):
    """Every setting of the service; README lists them with their defaults."""

    model_config = SettingsConfigDict(env_prefix="MMS_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path(".mms")
    database_url: str | None = None
    # Per process: keep (API processes + workers) x (size + overflow) below the database's
    # max_connections. A request that finds them all busy waits, then gets a 503.
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=15, ge=0)
    # API requests of one process past the database gate at a time (the rest queue on the event
    # loop): few, as each is a thread contending for the interpreter lock (app.api.middleware).
    api_concurrency: int = Field(default=4, ge=1, le=256)
    db_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    auto_migrate: bool | None = None  # None: only the embedded SQLite database migrates itself

    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    public_url: str | None = None  # how clients reach the service; default http://host:port
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    secret_key: str | None = None
    issuer: str = "mms"
    audience: str = "mms-api"
    token_ttl_seconds: int = Field(default=3600, ge=60, le=86400)
    clock_skew_seconds: int = Field(default=60, ge=0, le=300)
    trusted_issuers: list[TrustedIssuer] = []
    jwks_refresh_min_seconds: float = 30.0
    # A caller's roles are re-read at most this often (0: on every request); revoking a role
    # takes effect within it.
    auth_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    idempotency_ttl_seconds: int = Field(default=86400, ge=60, le=30 * 86400)

    asset_store: Literal["local", "azure"] = "local"
    asset_max_bytes: int = Field(default=2 * 1024**3, ge=1)
    # Every other request body (JSON, the token form): the largest legitimate one, a manifest
    # with 100 inline assets of 4 KiB URLs, is under half of the default.
    max_json_body_bytes: int = Field(default=1024**2, ge=1024)
    asset_url_ttl_days: int = Field(default=30, ge=1, le=365)
    # An upload file nobody has written to for this long is a dead process's: removed at start.
    upload_stale_seconds: int = Field(default=3600, ge=60)
    azure_storage_connection_string: str | None = None
    azure_storage_container: str = "mms-assets"

    fetch_allow_hosts: list[str] = []  # host or host:port that may be private (e.g. an internal store)
    # A tenant's own private hosts, each allowed for one attached compute alone, keyed by its
    # path (/subscriptions/../resourceGroups/../accounts/../computes/NAME, any case): its swarm
    # manager and nodes, or its cluster's server. Nothing else (model and asset fetches,
    # webhooks, builds, another compute or account) reaches them: the operator vouches for an
    # address as one tenant's, where an installation-wide entry vouches for it to everyone.
    compute_allow_hosts: dict[str, list[str]] = {}
    fetch_max_bytes: int = Field(default=8 * 1024**3, ge=1)
    fetch_timeout_seconds: float = Field(default=1800.0, gt=0)
    extra_ca_bundle: Path | None = None  # PEM file of extra CAs trusted for fetches and builds
    # A tenant's kubeconfig may turn off the check of its cluster's certificate (a test cluster).
    kubernetes_allow_insecure_tls: bool = False

    # None: the embedded broker, a SQLite file under data_dir that `mms serve` and its own
    # worker share (one machine). Production: redis://host:6379/0.
    broker_url: str | None = None
    build_queue: str = "mms-builds"
    # Where images are pushed: host[:port][/prefix]. None: the embedded image store, an OCI
    # image layout under data_dir that the service itself serves at /v2/.
    registry: str | None = None
    registry_username: str | None = None
    registry_password: str | None = None
    # A build retries a call to the registry that is unreachable or failing (5xx, 429) for
    # this long, saying so in its log, before the build fails: a registry restart or failover
    # is ridden out. Less than the run deadline, which bounds the build as a whole (by
    # default half of a run deadline shorter than this).
    registry_retry_seconds: float = Field(default=300.0, ge=0)
    # The embedded store's garbage collection (mms images gc, and the workers' beat every
    # interval): blobs no tag reaches go once untouched this long. Keep it longer than any
    # build (MMS_BUILD_RUN_DEADLINE_SECONDS): a build's blobs wait there for its manifest.
    image_gc_grace_seconds: int = Field(default=86400, ge=60)
    image_gc_interval_seconds: float = Field(default=3600.0, gt=0)
    # oci: daemonless, layers pushed over the registry API, conda packages by py-rattler;
    # docker: RUN steps, and conda packages by the base's own conda.
    builder: Literal["oci", "docker"] = "oci"
    build_cache_dir: Path | None = None  # the workers' wheel cache; default <data_dir>/build-cache
    # Where builds get Python packages (the operator's choice: tenants' requirement lines may
    # not name an index, a URL or a path).
    pip_index_url: str = "https://pypi.org/simple"
    # The conda channels a conda file may name, and where the oci builder reads them: a name
    # (conda-forge: conda.anaconda.org), name=URL (a mirror under that name, for a closed
    # network), or a URL. A file naming no channel gets them all, in this order.
    conda_channels: list[str] = ["conda-forge", "defaults"]
    # How many installed conda environments each worker machine keeps (in its build cache) for
    # a rebuild of the same packages; 0: none, every build installs again.
    conda_environments_kept: int = Field(default=4, ge=0)
    # Limits of a contained step (a source-only package's build backend, run in bubblewrap).
    sandbox_cpu_seconds: int = Field(default=900, ge=1)
    sandbox_memory_mb: int = Field(default=4096, ge=64)
    sandbox_processes: int = Field(default=256, ge=8)
    sandbox_disk_mb: int = Field(default=2048, ge=16)
    sandbox_wall_seconds: float = Field(default=1800.0, gt=0)
    # The engine the docker builder uses; DOCKER_HOST as the Docker tools read it.
    docker_host: str | None = Field(default=None, validation_alias=AliasChoices("MMS_DOCKER_HOST", "DOCKER_HOST"))
    # The engine network a docker build's RUN steps (tenants' code) run in, and the egress
    # proxy (http://host:port) through which they reach the package indexes, and nothing else:
    # scripts/infra/build-network.sh makes both. None: RUN steps get no network at all. The
    # oci builder's RUN steps reach the same proxy from the worker's own network namespace
    # (workers/builders/step_network.py): it needs the proxy only, the docker builder both.
    build_network: str | None = None
    build_proxy: str | None = Field(default=None, pattern=r"^(http://[^/?#@\s]+/?)?$")

    @model_validator(mode="after")
    def _builds_never_share_a_network(self) -> Settings:
        network = self.build_network or ""
        if network in ("host", "bridge", "default") or network.startswith("container:"):
            raise ValueError(
                f"MMS_BUILD_NETWORK={network} would let a build's RUN steps reach "
                "the engine's host or other containers: name a contained network "
                "(scripts/infra/build-network.sh), or leave it unset for none"
            )
        return self

    default_base_image: str | None = None  # default FROM; None: the newest published base image
    build_lease_seconds: int = Field(default=60, ge=5)
    build_max_attempts: int = Field(default=3, ge=1)
    build_queue_deadline_seconds: int = Field(default=3600, ge=10)  # NotStarted longer: Failed
    build_run_deadline_seconds: int = Field(default=3600, ge=10)  # Running longer: Failed
    build_republish_seconds: int = Field(default=60, ge=1)  # NotStarted this long: ring again
    # auto: start each built image once wherever an engine is reachable (DOCKER_HOST, else
    # the default socket), else Succeed saying it was skipped; required: no engine fails the
    # build; off: never (the image says so).
    smoke_test: Literal["auto", "required", "off"] = "auto"
    smoke_test_timeout_seconds: int = Field(default=120, ge=5)
    # The smoke test's container runs a tenant's init(): its limits. Memory (swap included)
    # leaves room for a SparkPython image's JVM (512 MB heap plus its overhead) and a model;
    # pids counts processes and threads (a JVM starts a hundred or more).
    smoke_test_memory_mb: int = Field(default=2048, ge=64)
    smoke_test_pids: int = Field(default=512, ge=32)
    smoke_test_cpus: float = Field(default=2.0, gt=0)
    smoke_test_disk_mb: int = Field(default=1024, ge=16)  # what init() may write
    # The docker builder's RUN steps run a tenant's code in the engine: memory and processes
    # of each step, and disk and time of all of them (workers/builders/run_limits.py).
    build_run_memory_mb: int = Field(default=4096, ge=64)
    build_run_pids: int = Field(default=1024, ge=32)
    build_run_disk_mb: int = Field(default=10240, ge=16)
    build_run_seconds: int = Field(default=1800, ge=5)
    build_run_cpu_seconds: int = Field(default=3600, ge=1)
    # A worker asked to stop (SIGTERM) lets a running build finish for this long, then hands
    # it back to the queue for another worker.
    build_shutdown_grace_seconds: float = Field(default=20.0, ge=0)

    # Web services (issue 16) are being built in slices: today their API records services and
    # computes, but nothing deploys them (a service stays Transitioning, a delete Deleting).
    # Until the workers do, the routes are served only when this is on (the tests turn it on).
    web_services_preview: bool = False
    # Where scoring requests go (the scoring gateway's own origin):
    # a service's scoringUri is <this>/api/v1/service/<id>/score.
    scoring_url: str = Field(default="http://127.0.0.1:8001", pattern=r"^https?://[^/?#@\s]+$")
    # The scoring gateway (`mms gateway`): where it listens (default: loopback, on the port of
    # MMS_SCORING_URL), how long it trusts what it read of a service (keys, traffic
    # generation, ready replicas: a regenerated key is refused within it), and the largest
    # request it forwards and reply it takes from a replica (the tenant's code: a reply beyond
    # it is a 502, never buffered further).
    gateway_host: str = "127.0.0.1"
    gateway_port: int | None = Field(default=None, ge=1, le=65535)
    gateway_cache_seconds: float = Field(default=2.0, ge=0, le=5)
    gateway_max_request_bytes: int = Field(default=100 * 1024**2, ge=1024)
    gateway_max_response_bytes: int = Field(default=16 * 1024**2, ge=1024)
    # Whether the workers' engine is a deployment target: the compute named `local`, listed in
    # every account (the API holds no engine socket and cannot ask; off where workers have none).
    local_compute: bool = True
    # The operator's swarm, as the Docker tools name an engine (unix:///var/run/docker.sock,
    # tcp://…): when set, the compute named `swarm`, listed in every account. v1 runs on one
    # node, the workers' own engine in swarm mode: the scoring gateway connects to the tasks'
    # addresses on their service bridge, which only that engine's host can reach.
    swarm_docker_host: str | None = None
    # Replicas a service may ask for on local and swarm: a generation and its successor share
    # a /27 of the service subnet pool while a rolling update runs.
    service_max_replicas: int = Field(default=10, ge=1, le=13)
    # What one replica may ask for on local and swarm (engines every tenant shares), and how many
    # services an account may hold (each takes one of an engine's service subnets).
    service_max_cpu: float = Field(default=2.0, gt=0, le=64)
    service_max_memory_gb: float = Field(default=4.0, ge=0.125, le=1024)
    services_per_account: int = Field(default=20, ge=1, le=2048)
    # Force-deleted services whose removal from a target the account attached is still pending
    # (each row holds a copy of the target's credentials): past this many, a force delete is
    # refused. An account's own delete is not (it queues at most one row a service, once).
    cleanups_per_account: int = Field(default=50, ge=1, le=10000)
    # Where the local engine's service networks get their subnets: a /27 each (one bridge per
    # service, workers/deploy/local_network.py), so a /16 holds 2048 services. Keep it clear of
    # every other network the engine's host routes (the build network, the LAN).
    service_subnet_pool: str = "10.213.0.0/16"
    # A replica's root filesystem is read-only; /tmp and $HOME are memory-backed, this large
    # each (counted against its memory), and it may run this many processes and threads.
    service_tmp_mb: int = Field(default=64, ge=1, le=16384)
    service_pids: int = Field(default=256, ge=32)
    # A deploy worker that cannot read the engine's host firewall itself (not root, or not in
    # that network namespace: the compose stack's) trusts this file instead, while it is younger
    # than 90 s: `scripts/infra/service-network.sh --attest FILE`, run as root where the
    # engine is, rewrites it each time the rules pass and removes it when they do not.
    service_firewall_attestation: Path | None = None

    # The reconciler: its passes go to a queue of their own (never behind a build), consumed by
    # `mms worker --deploy`; a new generation that does not answer GET / on every replica
    # within service_start_seconds of the change fails (a create) or is rolled back (an update).
    deploy_queue: str = "mms-deploy"
    service_start_seconds: int = Field(default=300, ge=10)
    # Passes of one tenant's (subscription's) services running at once in one deploy worker
    # process: its slow passes (a pull from a registry that trickles, up to 11 minutes) never
    # hold all of a worker's pass threads (--concurrency, at least 4) while other tenants' wait.
    deploy_passes_per_tenant: int = Field(default=2, ge=1)

    @field_validator("service_subnet_pool")
    @classmethod
    def _service_subnet_pool_is_a_range(cls, value: str) -> str:
        try:
            pool = ipaddress.IPv4Network(value.strip())
        except ValueError as exc:
            raise ValueError(f"MMS_SERVICE_SUBNET_POOL: not an IPv4 network ({exc})") from None
        if not 16 <= pool.prefixlen <= 24:
            raise ValueError(f"MMS_SERVICE_SUBNET_POOL: /{pool.prefixlen} out of range (/16 to /24)")
        return str(pool)

    @field_validator("compute_allow_hosts")
    @classmethod
    def _compute_allow_hosts_name_computes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        bound: dict[str, list[str]] = {}
        for path, hosts in value.items():
            key = compute_path_key(path)
            if key is None:
                raise ValueError(
                    f"MMS_COMPUTE_ALLOW_HOSTS: {path!r} is not a compute's path "
                    "(/subscriptions/SUB/resourceGroups/GROUP/accounts/ACCOUNT/computes/NAME)"
                )
            for (what, rule), name in zip(_COMPUTE_PATH_NAMES, path.strip().strip("/").split("/")[1::2], strict=True):
                if not rule.matches(name):
                    raise ValueError(f"MMS_COMPUTE_ALLOW_HOSTS: in {path!r}, {name!r} is not {what} name ({rule.rule})")
            if key.endswith("/computes/local"):  # the built-in target (app.services.computes.LOCAL)
                raise ValueError(
                    f"MMS_COMPUTE_ALLOW_HOSTS: {path!r} is the built-in local target, which is never attached: "
                    "name an attached compute"
                )
            for host in hosts:
                if not _is_host_entry(host):
                    raise ValueError(
                        f"MMS_COMPUTE_ALLOW_HOSTS: {host!r} (for {path}) is not host or host:port "
                        "(an IPv6 address as [v6] or [v6]:port): no scheme, path or login"
                    )
            bound.setdefault(key, []).extend(_host_entry(host) for host in hosts)
        return bound

    events_poll_seconds: float = Field(default=0.25, gt=0, le=10)  # how often an API process looks for new events
    # How often an API process re-reads the roles of its event streams' callers (one query for
    # all of them): a deleted principal's or removed role's stream ends within it.
    stream_recheck_seconds: float = Field(default=5.0, gt=0, le=60)
    events_retention_days: int = Field(default=7, ge=1)
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=60)
    webhook_max_attempts: int = Field(default=8, ge=1, le=20)
    webhook_retry_base_seconds: float = Field(default=10.0, gt=0)  # doubled per attempt, at most an hour
    # After rotateSecret, deliveries are signed with the old secret too for this long, so
    # receivers can switch without dropping a delivery.
    webhook_secret_overlap_seconds: int = Field(default=86400, ge=0)

    @property
    def effective_fetch_allow_hosts(self) -> frozenset[str]:
        """Hosts the fetcher may reach on private addresses: the configured ones and, in
        development, this service's own asset URLs and a local Azurite."""
        hosts = {h.lower() for h in self.fetch_allow_hosts}
        if self.env == "development":
            hosts.add(urlsplit(self.resolved_public_url).netloc.lower())
            for part in (self.azure_storage_connection_string or "").split(";"):
                name, _, value = part.partition("=")
                if name.strip().lower() == "blobendpoint" and value:
                    hosts.add(urlsplit(value.strip()).netloc.lower())
        return frozenset(hosts)

    def compute_allow_hosts_for(self, compute_path: str | None) -> frozenset[str]:
        """The hosts MMS_COMPUTE_ALLOW_HOSTS allows for the compute at ``compute_path`` alone
        (none for None: a compute whose path is not known)."""
        key = compute_path_key(compute_path or "")
        if key is None:
            return frozenset()
        # Keys compared as read (settings copied with model_copy skip the validator's forms).
        return frozenset(
            _host_entry(host)
            for path, hosts in self.compute_allow_hosts.items()
            if compute_path_key(path) == key
            for host in hosts
        )

    @property
    def resolved_gateway_port(self) -> int:
        """MMS_GATEWAY_PORT, else the port of MMS_SCORING_URL (its scheme's default when it names none)."""
        if self.gateway_port is not None:
            return self.gateway_port
        url = urlsplit(self.scoring_url)
        return url.port or (443 if url.scheme == "https" else 80)

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def is_embedded_broker(self) -> bool:
        return not self.broker_url

    @property
    def is_embedded_registry(self) -> bool:
        return not self.registry

    @property
    def image_registry(self) -> str:
        """The address images are named by and pulled from: the registry, or this service."""
        return (self.registry or urlsplit(self.resolved_public_url).netloc).rstrip("/")

    @property
    def available_builders(self) -> tuple[str, ...]:
        # Both everywhere: on the embedded default the docker builder exports what the engine
        # built into the service's own store; a worker without an engine fails such a build
        # saying so (the settings cannot ask an engine).
        return ("oci", "docker")

    @property
    def uploads_dir(self) -> Path:
        """Where uploads are received before they are stored."""
        return self.data_dir / "incoming"

    @property
    def image_store_dir(self) -> Path:
        """The embedded image store (an OCI image layout)."""
        return self.data_dir / "images"

    @property
    def resolved_build_cache_dir(self) -> Path:
        return self.build_cache_dir or self.data_dir / "build-cache"

    @property
    def requires_https_urls(self) -> bool:
        """Outside development, SAS URLs must be https."""
        return self.env != "development"

    @model_validator(mode="after")
    def _registry_retries_end_before_the_build_deadline(self) -> Settings:
        if self.registry_retry_seconds < self.build_run_deadline_seconds:
            return self
        if "registry_retry_seconds" not in self.model_fields_set:  # the default, a short deadline
            self.registry_retry_seconds = self.build_run_deadline_seconds / 2
        else:
            raise ValueError(
                f"MMS_REGISTRY_RETRY_SECONDS ({self.registry_retry_seconds:g}) must be less "
                f"than MMS_BUILD_RUN_DEADLINE_SECONDS ({self.build_run_deadline_seconds}): "
                "a build waiting for the registry would outlive its deadline"
            )
        return self

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.env == "production":
            key = self.secret_key or ""
            if key.lower() in _PLACEHOLDER_SECRETS or len(key) < _MIN_SECRET_LENGTH:
                raise ValueError(
                    "MMS_SECRET_KEY must be set to a random value of at least "
                    f"{_MIN_SECRET_LENGTH} characters when MMS_ENV=production "
                    '(e.g. python -c "import secrets; print(secrets.token_urlsafe(48))")'
                )
        return self

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL: MMS_DATABASE_URL, or the embedded SQLite file."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'mms.db').resolve()}"

    @property
    def is_embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def should_auto_migrate(self) -> bool:
        if self.auto_migrate is not None:
            return self.auto_migrate
        return self.is_embedded_database

    @property
    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def served_url_file(self) -> Path:
        """Where `mms serve` records the URL it serves at, for the commands and workers beside it."""
        return self.data_dir / "served-url"

    def record_served_url(self) -> None:
        """Record resolved_public_url, and this process's id, in the data folder (atomically:
        readers never see half)."""
        private_dir(self.data_dir)
        tmp = self.served_url_file.with_name(f".served-url.{secrets.token_hex(8)}")
        write_new_private_file(tmp, f"{self.resolved_public_url}\n{os.getpid()}\n".encode())
        os.replace(tmp, self.served_url_file)

    def recorded_served_url(self) -> str | None:
        """The URL a running `mms serve` recorded; None when there is none, or its process is
        gone (a stale address would make a worker trust whatever listens there next)."""
        try:
            url, _, pid = self.served_url_file.read_text(encoding="utf-8").partition("\n")
        except OSError:
            return None
        url, pid = url.strip(), pid.strip()
        if not url.startswith(("http://", "https://")) or not pid.isascii() or not pid.isdigit():
            return None
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return None
        except (OSError, OverflowError):  # alive but not ours to signal; or nonsense
            pass
        return url.rstrip("/")

    @property
    def swarm_compute(self) -> bool:
        """Whether the operator's swarm is a deployment target (the built-in compute `swarm`)."""
        return bool(self.swarm_docker_host)

    @property
    def service_url(self) -> str:
        """How another process (a worker, `mms admin bootstrap`) reaches the service:
        MMS_PUBLIC_URL, else MMS_HOST/MMS_PORT when set, else the URL a running `mms serve`
        recorded in the data folder, else http://127.0.0.1:8000."""
        if self.public_url or {"host", "port"} & self.model_fields_set:
            return self.resolved_public_url
        return self.recorded_served_url() or self.resolved_public_url

    def resolved_secret_key(self) -> str:
        """The key that seals stored secrets; in development one is made and kept in the data folder."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret.key"
        if not path.exists():
            private_dir(self.data_dir)
            tmp = path.with_name(f".secret.key.{secrets.token_hex(8)}")
            write_new_private_file(tmp, secrets.token_urlsafe(48).encode("ascii"))
            # link() refuses to overwrite: processes starting together agree on the first key.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text(encoding="ascii").strip()


_COMPUTE_PATH_WORDS = ["subscriptions", "resourcegroups", "accounts", "computes"]
_COMPUTE_PATH_NAMES = (
    ("a subscription", names.SUBSCRIPTION),
    ("a resource group", names.RESOURCE_GROUP),
    ("an account", names.ACCOUNT),
    ("a compute", names.COMPUTE),
)


def compute_path(subscription: str, resource_group: str, account: str, compute: str) -> str:
    """A compute's path, as MMS_COMPUTE_ALLOW_HOSTS names it."""
    return f"/subscriptions/{subscription}/resourceGroups/{resource_group}/accounts/{account}/computes/{compute}"


def compute_path_key(path: str) -> str | None:
    """``path`` as compared, or None when it names no compute: the account's part in any case
    (ARM names, as roles and account lookups compare them), the compute's name exactly (an
    account may hold ``prod`` and ``Prod``, two computes)."""
    parts = path.strip().strip("/").split("/")
    if len(parts) != 8 or [p.lower() for p in parts[0::2]] != _COMPUTE_PATH_WORDS:
        return None
    if not all(parts[1::2]):
        return None
    return "/" + "/".join(p.lower() for p in parts[:7]) + "/" + parts[7]


def _host_entry(entry: str) -> str:
    """An allow-list entry as the fetch policy and the attach compare it: lower-cased, an
    address in its one written form (``FD00:0::1`` is ``fd00::1``, ``[fd00::1]:2376`` stays
    bracketed)."""
    text = entry.strip().lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    parts = urlsplit(f"//{text}")
    try:
        address = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        return text  # a name (with its port)
    written = f"[{address}]" if address.version == 6 else str(address)
    return f"{written}:{parts.port}" if parts.port else written


def _is_host_entry(entry: str) -> bool:
    """host, host:port, an IPv6 address, [v6] or [v6]:port: what the fetch policy matches."""
    text = entry.strip()
    if not text or any(c in text for c in "/@?#\\ \t"):
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        return False
    return bool(parts.hostname) and (port is None or port > 0) and not text.endswith(":")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
