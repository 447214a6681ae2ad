"""A replica's reply is hostile until read: huge headers, endless bodies, slow drips, bytes
that are not HTTP are 502s (silence is a 504) within the service's scoring timeout, each
connection is dropped and never reused, and the gateway's memory stays bounded while the
replicas push far more than the cap at it. Bounded: fixed request counts, 1 s timeouts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import pytest

from tests.gateway import hostile_replica as hostile
from tests.gateway.conftest import MAX_RESPONSE_BYTES, Deployed, Gateway, Services, address
from tests.scoring_server.scoring_server_harness import Server

TIMEOUT_MS = 1000
BEHAVIOURS = {
    "huge-headers": (hostile.huge_headers, 502),
    "endless-chunked-body": (hostile.endless_chunked_body, 502),
    "endless-body-until-close": (hostile.endless_body_until_close, 502),
    "huge-declared-body": (hostile.huge_declared_body, 502),
    "slow-headers": (hostile.slow_headers, 502),
    "slow-body": (hostile.slow_body, 502),
    "not-http": (hostile.not_http, 502),
    "silent": (hostile.silent, 504),
}


@pytest.fixture(scope="module")
def hostile_services(services: Services) -> Iterator[dict[str, tuple[hostile.HostileReplica, Deployed, int]]]:
    with ExitStack() as stack:
        deployed = {}
        for name, (behaviour, status) in BEHAVIOURS.items():
            replica = stack.enter_context(hostile.HostileReplica(behaviour).running())
            deployed[name] = (replica, services.deploy([replica.address], timeout_ms=TIMEOUT_MS), status)
        yield deployed


def _score(service: Deployed) -> tuple[int, float, dict]:
    started = time.monotonic()
    answer = httpx.post(
        service.score, json={"data": [1]}, headers={"Authorization": f"Bearer {service.primary}"}, timeout=10
    )
    return answer.status_code, time.monotonic() - started, answer.json()


@pytest.mark.parametrize("name", BEHAVIOURS)
def test_a_hostile_reply_is_refused_within_the_timeout_and_its_connection_dropped(
    hostile_services: dict[str, tuple[hostile.HostileReplica, Deployed, int]], name: str
) -> None:
    replica, service, expected = hostile_services[name]
    connections = replica.connections
    for _ in range(3):
        status, seconds, body = _score(service)
        assert status == expected, body
        assert set(body) == {"error"}
        assert len(body["error"]) < 200 and "SSH-2.0" not in body["error"]  # the replica's bytes are not quoted
        assert seconds < TIMEOUT_MS / 1000 + 1.5
    # One connection a request: none was pooled and reused after a bad reply.
    assert replica.connections == connections + 3


def test_memory_stays_bounded_while_replicas_push_far_more_than_the_cap(
    hostile_services: dict[str, tuple[hostile.HostileReplica, Deployed, int]],
    gateway: Gateway,
    services: Services,
    replicas: list[Server],
) -> None:
    floods = [hostile_services[name] for name in ("huge-headers", "endless-chunked-body", "endless-body-until-close")]
    targets = [service for _, service, _ in hostile_services.values()]

    def round_of_requests() -> list[int]:
        with ThreadPoolExecutor(len(targets)) as pool:
            return [status for status, _, _ in pool.map(_score, targets)]

    pushed_before = sum(replica.total_sent for replica, _, _ in floods)
    for _ in range(4):
        assert round_of_requests() == [status for _, _, status in hostile_services.values()]
    pushed = sum(replica.total_sent for replica, _, _ in floods) - pushed_before
    # The replicas pushed well beyond the cap each time (kernel buffers took the rest); the
    # gateway read at most the cap of each and let go: its peak memory, over everything this
    # module sent it, stayed near what it had when it started.
    assert pushed > 12 * MAX_RESPONSE_BYTES, pushed
    grown = gateway.peak_rss_bytes() - gateway.started_peak
    assert grown < 32 * 1024 * 1024, f"the gateway's peak grew by {grown} bytes while replicas pushed {pushed}"
    # And it still serves a well-behaved replica.
    good = services.deploy([address(replicas[0])])
    assert _score(good)[0] == 200
