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


def scoring_base(scoring_url: str, service_id: object) -> str:
    """The scoring gateway's address for a service (``scoring_url``: MMS_SCORING_URL); its
    scoringUri is this + ``/score``, its swaggerUri + ``/swagger.json``."""
    return f"{scoring_url}/api/v1/service/{service_id}"


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
