"""The gateway keeps connections to a replica open and reuses them, and copes with a replica
that closes one after a reply without saying so."""

from __future__ import annotations

import httpx

from tests.gateway import hostile_replica as replicas
from tests.gateway.conftest import Services


def _score(url: str, key: str) -> httpx.Response:
    return httpx.post(url, json={"data": [1]}, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_a_replicas_connection_is_kept_and_reused(services: Services) -> None:
    with replicas.HostileReplica(replicas.well_behaved).running() as replica:
        service = services.deploy([replica.address])
        answers = [_score(service.score, service.primary) for _ in range(10)]
        assert [a.status_code for a in answers] == [200] * 10
        assert [a.json() for a in answers] == [{"connection": 1, "request": n} for n in range(1, 11)]
        assert replica.connections == 1


def test_a_connection_the_replica_closed_after_replying_is_not_reused(services: Services) -> None:
    with replicas.HostileReplica(replicas.hangs_up_after_replying).running() as replica:
        service = services.deploy([replica.address])
        answers = [_score(service.score, service.primary) for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert [a.json()["connection"] for a in answers] == [1, 2, 3, 4, 5]
        assert replica.requests == 5  # each request ran once
