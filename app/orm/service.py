"""Web services and the compute targets they run on (issue 16; docs/design/web-services.md §3).

``local`` (the workers' own engine) is not a row: it is a setting, shown in every account.
A service's state is written only by app.deployments, through its transition table; its
replicas only by the reconciler (the scoring gateway reads them), which also keeps its
lease and due time on the service's row.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.deployments.states import OperationState, ServiceState
from app.orm.base import Base, CreatedAt, UtcDateTime, UuidPrimaryKey, utcnow


def _state_column(states: type[enum.StrEnum], name: str) -> Enum:
    # Stored as the value in a VARCHAR with a CHECK, as an image's state (app.orm.image).
    return Enum(
        states,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Compute(UuidPrimaryKey, CreatedAt, Base):
    """A target the tenant attached (swarm, kubernetes): where to reach it, and its sealed credentials."""

    __tablename__ = "computes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    compute_type: Mapped[str] = mapped_column(String(16))  # swarm | kubernetes
    properties: Mapped[dict[str, Any]] = mapped_column(JSON)  # dockerHost, namespace: nothing secret
    # TLS client certificate, key and CA, or a kubeconfig: JSON, sealed (app.sealing); never shown.
    sealed_credentials: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(255))


class Service(UuidPrimaryKey, CreatedAt, Base):
    __tablename__ = "services"
    __table_args__ = (
        UniqueConstraint("account_id", "name"),
        Index("ix_services_state", "state"),
        Index("ix_services_due_at", "due_at"),
        Index("ix_services_put_off_since", "put_off_since"),
        Index("ix_services_lease_expires_at", "lease_expires_at"),
    )

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    description: Mapped[str | None] = mapped_column(String(512))
    compute_name: Mapped[str] = mapped_column(String(32))  # local, or a Compute's name
    compute_type: Mapped[str] = mapped_column(String(16))
    # A compute the account attached (not a built-in target): decided when the service is made,
    # never again from the name and the workers' settings (migration 0020).
    compute_attached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # An image a service runs cannot be deleted (the API answers 409 ImageInUse first). NO ACTION,
    # not RESTRICT: checked at the end of the statement, so an account's cascade removes both.
    image_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("images.id"), index=True)

    # The desired spec, as the tenant last set it.
    num_replicas: Mapped[int | None] = mapped_column(Integer)  # None when autoscaled
    autoscaler: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    cpu: Mapped[float] = mapped_column(Float)
    memory_gb: Mapped[float] = mapped_column(Float)
    auth_enabled: Mapped[bool] = mapped_column(Boolean)
    scoring_timeout_ms: Mapped[int] = mapped_column(Integer)
    # The desired generation: a new one for each image swap or resize, above every one given
    # before (last_generation), so a failed generation's leftovers (a replica whose removal
    # failed, a swarm service mms-<id>-g<n> still going, its log lines) never pass for a later one's.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    last_generation: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # What the traffic generation runs while a newer one rolls out (set by the update that
    # started it, forgotten once the newer one takes traffic or is rolled back): what a roll
    # back restores. Its image cannot be deleted meanwhile, as image_id's.
    serving_image_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("images.id"), index=True)
    serving_cpu: Mapped[float | None] = mapped_column(Float)
    serving_memory_gb: Mapped[float | None] = mapped_column(Float)
    # The generation that takes scoring requests; None until one ever has (no scoring URI yet).
    traffic_generation: Mapped[int | None] = mapped_column(Integer)
    # Where the orchestrator says the service is reached when its traffic does not pass the
    # scoring gateway (kubernetes: the Service's cluster address, host:port); written by the
    # reconciler, shown as the scoring URI, never routed to by the gateway.
    endpoint: Mapped[str | None] = mapped_column(String(64))

    # Written only by app.deployments, through its transition table.
    state: Mapped[ServiceState] = mapped_column(_state_column(ServiceState, "state"))
    error: Mapped[str | None] = mapped_column(Text)
    replicas_desired: Mapped[int] = mapped_column(Integer)
    replicas_ready: Mapped[int] = mapped_column(Integer, default=0)

    # The scoring keys: sealed (POST .../keys shows them) and as HMAC digests (what the gateway compares).
    sealed_primary_key: Mapped[str] = mapped_column(Text)
    sealed_secondary_key: Mapped[str] = mapped_column(Text)
    primary_key_digest: Mapped[str] = mapped_column(String(64))
    secondary_key_digest: Mapped[str] = mapped_column(String(64))
    keys_version: Mapped[int] = mapped_column(Integer, default=1)

    # The reconciler's: one pass at a time (a fenced lease, as an image build's), the next one
    # wanted at due_at, and when traffic last moved to a new generation (the old one drains).
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    due_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=utcnow)
    # Since when its passes have found no slot free (workers.deploy.pass_slots), None once one
    # runs: its place in line for the next freed slot, in whichever worker process; and when the
    # schedule last handed it to a worker (None while it is parked for its retry: migration 0022).
    put_off_since: Mapped[datetime | None] = mapped_column(UtcDateTime)
    handed_out_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    switched_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The tenant's changes (create, update, delete): counted, and the last one dated.
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    changed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, default=utcnow)

    created_by: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ServiceOperation(UuidPrimaryKey, CreatedAt, Base):
    """The 202 of a service's create, update or delete, polled at .../operations/{id}."""

    __tablename__ = "service_operations"

    account_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("accounts.id", ondelete="CASCADE"), index=True)
    # SET NULL: a delete's operation outlives the service it removed.
    service_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("services.id", ondelete="SET NULL"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))  # OperationKind
    state: Mapped[OperationState] = mapped_column(_state_column(OperationState, "state"))
    error: Mapped[str | None] = mapped_column(Text)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ServiceReplica(Base):
    """A replica of one generation of a service as the reconciler last saw it in the
    orchestrator: where the scoring gateway reaches it, and whether it answers ``GET /``."""

    __tablename__ = "service_replicas"

    service_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("services.id", ondelete="CASCADE"), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the container's or task's id
    address: Mapped[str] = mapped_column(String(64))  # host:port, as the gateway connects to it
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    observed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ServiceLogLine(Base):
    """A line a service's replica printed, copied from the orchestrator by the reconciler (the
    API holds no engine): ``GET .../services/{id}/logs`` reads them, also after a failed
    generation's replicas are gone. Only the newest lines of a service are kept."""

    __tablename__ = "service_logs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    service_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("services.id", ondelete="CASCADE"), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    replica_id: Mapped[str] = mapped_column(String(128))
    # When the orchestrator says it was printed, in nanoseconds since the epoch: the next
    # pass copies only what is newer.
    logged_ns: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text)


class Installation(Base):
    """One row: this installation's id, made when its database was. It labels the engine
    objects the reconciler makes, so installations that share an engine (staging beside
    production, test sessions) never take each other's objects for orphans."""

    __tablename__ = "installation"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # Where the id was made or last adopted (app.deployments.installation): a copy of the
    # database is told apart by it.
    database_identity: Mapped[str | None] = mapped_column(String(200))


class ClusterCleanup(UuidPrimaryKey, CreatedAt, Base):
    """What a force-deleted service (alone, or with its account) left on its kubernetes cluster
    or the swarm its account attached, still to remove: the row goes without the target's say
    (and an account's computes with it), so the target's credentials are kept here (sealed, as
    on the compute) until the deploy worker's sweep has deleted the service's objects by label,
    or has given up (workers/deploy/cluster_cleanup.py)."""

    __tablename__ = "cluster_cleanups"

    service_id: Mapped[uuid.UUID] = mapped_column(Uuid)  # no foreign key: the service is gone
    # The service's account (no foreign key: a row outlives its account's delete): what the
    # per-account cap counts and the sweep picks fairly by; None for a row from before 0021
    # whose account could not be told.
    account_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    # ... and its subscription (lower-cased), the tenant: what the sweep picks fairly by (a
    # tenant makes any number of accounts); None as for the account.
    subscription_id: Mapped[str | None] = mapped_column(String(64))
    compute_type: Mapped[str] = mapped_column(String(20), default="kubernetes", server_default="kubernetes")
    namespace: Mapped[str] = mapped_column(String(63))  # a kubernetes target's; "" for a swarm
    docker_host: Mapped[str | None] = mapped_column(String(512))  # a swarm's manager, as the compute had it
    # The compute's path (app.config.compute_path): the private hosts the operator allows for it
    # alone (MMS_COMPUTE_ALLOW_HOSTS) stay allowed for its cleanup; None for a row from before 0023.
    compute_path: Mapped[str | None] = mapped_column(String(400))
    # The compute's sealed credentials as they were ({"kubeconfig": ...} or {"tls": ...},
    # app.sealing); never shown.
    sealed_credentials: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Also the claim of a sweep at work on it: pushed past the sweep's lease while it runs.
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)  # the driver's message: no credential in it
