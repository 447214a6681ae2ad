"""However many ready replicas a service's route lists (a tenant's swarm reports what it likes),
one request tries at most MAX_REPLICA_TRIES of those that do not take its connection, all within
the service's scoring timeout."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx

from app.gateway.app import MAX_REPLICA_TRIES
from app.gateway.forwarder import CONNECT_TIMEOUT_SECONDS
from tests.embedded_service import free_port
from tests.gateway.conftest import Gateway, Services

MANY = 40


def _tries(gateway: Gateway, service_id: str) -> int:
    """The replicas the gateway found not taking a connection, for the service, as it logged them."""
    tried = 0
    for line in gateway.log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        tried += record.get("event") == "gateway.replica_unreachable" and record.get("service") == service_id
    return tried


@contextmanager
def _hanging(count: int) -> Iterator[list[str]]:
    """``count`` loopback addresses whose connects hang: a listener whose backlog (0) one
    connection of ours fills, which never accepts (the kernel drops the next SYNs)."""
    with ExitStack() as stack:
        addresses = []
        for _ in range(count):
            listener = stack.enter_context(socket.create_server(("127.0.0.1", 0), backlog=0))
            filler = stack.enter_context(socket.create_connection(listener.getsockname(), timeout=1))
            assert filler
            addresses.append(f"127.0.0.1:{listener.getsockname()[1]}")
        yield addresses


def test_a_request_tries_a_bounded_number_of_replicas(services: Services, gateway: Gateway) -> None:
    refused = [f"127.0.0.1:{free_port()}" for _ in range(MANY)]  # nothing listens there
    service = services.deploy(refused, auth=False)
    answer = httpx.post(service.score, json={"data": [1]}, timeout=30)
    assert answer.status_code == 503, answer.text
    time.sleep(0.5)  # the log's lines are written as they come
    assert 1 <= _tries(gateway, service.id) <= MAX_REPLICA_TRIES


def test_a_request_over_replicas_that_never_connect_ends_within_the_scoring_timeout(
    services: Services, gateway: Gateway
) -> None:
    timeout_ms = 1000
    with _hanging(10) as addresses:
        service = services.deploy(addresses, auth=False, timeout_ms=timeout_ms)
        started = time.monotonic()
        answer = httpx.post(service.score, json={"data": [1]}, timeout=30)
        took = time.monotonic() - started
    assert answer.status_code == 503, answer.text
    # The timeout, and at most one more connect begun just before it ran out.
    assert took < timeout_ms / 1000 + CONNECT_TIMEOUT_SECONDS + 0.3, f"the request took {took:.1f} s"
