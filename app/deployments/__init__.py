"""Web services (issue 16): the one owner of a service's state.

Every move of ``Service.state`` goes through ``transitions.TRANSITIONS`` and
``transitions.move``, a conditional UPDATE (or DELETE) that is safe across any number of API
processes and reconciler passes. Submodules: ``states`` (the vocabulary), ``transitions`` (the
table), ``keys`` (scoring keys: made, sealed, digested), ``lifecycle`` (the API's moves),
``kubeconfig`` (the policy a tenant's kubeconfig must pass, for the API and the workers).

Only ``states`` is imported here: the ORM imports it, and the rest imports the ORM.
"""

from app.deployments.states import OperationKind, OperationState, ServiceState

__all__ = ["OperationKind", "OperationState", "ServiceState"]
