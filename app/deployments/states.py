"""The states of a web service and of its operations, the one vocabulary every layer uses."""

from __future__ import annotations

import enum


class ServiceState(enum.StrEnum):
    """Transitioning → Healthy | Unhealthy | Failed, as the orchestrator reports (Azure's names);
    Deleting once the tenant asked for it, until the orchestrator holds nothing of it
    (app.deployments.transitions has every move)."""

    TRANSITIONING = "Transitioning"
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"
    FAILED = "Failed"
    DELETING = "Deleting"


# Where a tenant's change (PATCH) may start from: not while one is being applied, nor once deleting.
SETTLED = frozenset({ServiceState.HEALTHY, ServiceState.UNHEALTHY, ServiceState.FAILED})

# Not a state a service is in: what an event of a service's deletion says (never stored on it).
DELETED_STATE = "Deleted"

_ERROR_CODES = {ServiceState.FAILED: "DeploymentFailed", ServiceState.UNHEALTHY: "ServiceUnhealthy"}


def service_error(state: ServiceState, error: str | None) -> tuple[str, str] | None:
    """The (code, message) a service shows its tenant (in a GET and in its events); None without an error."""
    if not error:
        return None
    return _ERROR_CODES.get(state, "ServiceError"), error


def scoring_base(
    scoring_url: str | None,
    service_id: object,
    *,
    compute_type: str,
    endpoint: str | None,
    traffic_generation: int | None,
) -> str | None:
    """Where a service is scored, once a generation of it has taken requests (None before);
    its scoringUri is this + ``/score``, its swaggerUri + ``/swagger.json``. The scoring
    gateway's address (``scoring_url``: MMS_SCORING_URL; None: unknown here), but on a target
    whose traffic does not pass the gateway (kubernetes), the address its orchestrator reports
    (``endpoint``: a cluster address, reachable from inside that cluster only)."""
    if traffic_generation is None:
        return None
    if compute_type == "kubernetes":
        return None if endpoint is None else f"http://{endpoint}"
    return None if scoring_url is None else f"{scoring_url}/api/v1/service/{service_id}"


class OperationKind(enum.StrEnum):
    """What a service operation does: the 202 of a POST, a PATCH or a DELETE."""

    CREATE = "Create"
    UPDATE = "Update"
    DELETE = "Delete"


class OperationState(enum.StrEnum):
    """Running → Succeeded | Failed; the values are those of an image build's operation."""

    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
