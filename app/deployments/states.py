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
