"""A service's spec as the reconciler hands it to a driver, for the deploy tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from app.deployments.reconciler import Spec
from app.deployments.states import ServiceState


def swarm_spec(compute_name: str = "theirs") -> Spec:
    """A new service on the swarm ``compute_name``, one replica, about to start."""
    now = datetime.now(UTC)
    return Spec(
        id=uuid.uuid4(),
        account_id=uuid.uuid4(),
        state=ServiceState.TRANSITIONING,
        compute_type="swarm",
        compute_name=compute_name,
        compute_attached=compute_name != "swarm",
        image_id=uuid.uuid4(),
        image_location="registry.example.com/mms/a/b",
        image_digest="sha256:" + "0" * 64,
        generation=1,
        traffic_generation=None,
        replicas=1,
        cpu=0.5,
        memory_gb=0.5,
        scoring_timeout_ms=60000,
        revision=1,
        changed_at=now,
        switched_at=None,
    )
