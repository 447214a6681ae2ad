"""Image builds: the one owner of a build's state.

Every move of ``Image.state`` goes through ``transitions.TRANSITIONS`` and ``transitions.move``,
a conditional UPDATE (or DELETE) that is safe across any number of API processes and workers;
each move that changes a state records its event (and webhook deliveries) in the same
transaction. Submodules: ``states`` (the vocabulary), ``transitions`` (the table), ``events``
(what a move records), ``lifecycle`` (create, cancel, delete: the API's moves), ``leases``
(claim, renew, hand back, finish: a worker's moves), ``reaper`` (builds that stopped moving).

Only ``states`` is imported here: the ORM imports it, and the rest imports the ORM.
"""

from app.builds.states import DELETED_STATE, CreationState

__all__ = ["DELETED_STATE", "CreationState"]
