"""Key auth and forwarding through `mms gateway` to real scoring_server replicas, on
PostgreSQL and SQLite: either key scores, no key or a wrong one is a 401 the replica never
sees, a regenerated key stops working within 5 s, Authorization never reaches a replica
nor the gateway's log, traffic goes round the ready replicas of the traffic generation."""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest

from tests.embedded_service import free_port
from tests.gateway.conftest import Gateway, Services, address
from tests.scoring_server.scoring_server_harness import Server

SAFE_HEADERS = {"x-content-type-options": "nosniff", "content-security-policy": "default-src 'none'; sandbox"}


def score(url: str, key: str | None = None, payload: object = None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url, json={"data": [1, 2]} if payload is None else payload, headers=headers, timeout=10)


def assert_safe(response: httpx.Response) -> None:
    assert {name: response.headers.get(name) for name in SAFE_HEADERS} == SAFE_HEADERS


def assert_refused(response: httpx.Response, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"}
    assert_safe(response)
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_either_key_scores_and_the_replica_never_sees_it(
    services: Services, replicas: list[Server], gateway: Gateway
) -> None:
    service = services.deploy([address(replicas[0])])
    for key in (service.primary, service.secondary):
        answer = score(service.score, key, {"data": [3]}, **{"X-Trace": "t-1", "X-Ms-Request-Id": "req-1"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["echo"] == {"data": [3]}
        assert answer.json()["port"] == replicas[0].port
        received = {name.lower(): value for name, value in answer.json()["headers"].items()}
        assert "authorization" not in received
        assert key not in json.dumps(received)
        assert (received["x-trace"], received["content-type"]) == ("t-1", "application/json")
        assert answer.headers["x-ms-request-id"] == "req-1"  # the replica's own headers come back
        assert_safe(answer)
    log = gateway.log.read_text()
    assert service.id in log  # what the gateway logs: the service, status, replica
    assert service.primary not in log and service.secondary not in log


def test_no_key_or_a_wrong_one_is_a_401_that_never_reaches_the_replica(
    services: Services, replicas: list[Server]
) -> None:
    service = services.deploy([address(replicas[0])])
    before = score(service.score, service.primary).json()["calls"]
    other = services.deploy([address(replicas[0])])
    for refused in (
        score(service.score),
        score(service.score, "x" * 43),
        score(service.score, other.primary),  # another service's key
        score(service.score, service.primary[:-1]),
        score(service.score, Authorization=f"Basic {service.primary}"),
        score(service.score, Authorization=service.primary),
        score(service.score, "k" * 5000),
    ):
        assert_refused(refused)
    # run() counted none of them: the next request is the very next call.
    assert score(service.score, service.primary).json()["calls"] == before + 1


def test_a_regenerated_key_is_refused_within_five_seconds(services: Services, replicas: list[Server]) -> None:
    service = services.deploy([address(replicas[0])])
    assert score(service.score, service.primary).status_code == 200  # the gateway has the old key cached
    regenerated = httpx.post(f"{service.url}/regenerateKeys", json={"keyType": "Primary"}, headers=services.headers)
    assert regenerated.status_code == 200, regenerated.text
    new_primary = regenerated.json()["primaryKey"]
    assert new_primary != service.primary and regenerated.json()["secondaryKey"] == service.secondary
    changed = time.monotonic()
    while (status := score(service.score, service.primary).status_code) == 200:
        assert time.monotonic() - changed < 5, "the old key still works 5 s after it was regenerated"
        time.sleep(0.1)
    assert status == 401
    assert time.monotonic() - changed <= 5
    assert score(service.score, new_primary).status_code == 200
    assert score(service.score, service.secondary).status_code == 200  # the other key was kept


def test_a_service_without_auth_takes_requests_without_a_key(services: Services, replicas: list[Server]) -> None:
    service = services.deploy([address(replicas[1])], auth=False)
    assert score(service.score).status_code == 200
    answer = score(service.score, "whatever-the-caller-sends")
    assert answer.status_code == 200
    assert "authorization" not in {name.lower() for name in answer.json()["headers"]}


def test_two_ready_replicas_both_take_requests(services: Services, replicas: list[Server]) -> None:
    service = services.deploy([address(replica) for replica in replicas])
    ports = [score(service.score, service.primary).json()["port"] for _ in range(10)]
    assert sorted(set(ports)) == sorted(replica.port for replica in replicas)
    assert min(ports.count(replica.port) for replica in replicas) >= 4  # round robin, not chance


def test_a_replica_that_refuses_connections_is_passed_over(services: Services, replicas: list[Server]) -> None:
    gone = f"127.0.0.1:{free_port()}"  # nothing listens there
    service = services.deploy([gone, address(replicas[0])])
    answers = [score(service.score, service.primary) for _ in range(6)]
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.json()["port"] for a in answers} == {replicas[0].port}


@pytest.mark.parametrize(
    "spec",
    [
        {"ready": False},  # replicas not answering GET / yet
        {"traffic_generation": None},  # no generation has ever taken requests
        {"replica_generation": 2},  # ready replicas, but of a generation that takes no traffic
    ],
    ids=["not-ready", "no-traffic-generation", "other-generation"],
)
def test_no_ready_replica_is_a_503_to_retry(services: Services, replicas: list[Server], spec: dict) -> None:
    service = services.deploy([address(replicas[0])], **spec)
    refused = score(service.score, service.primary)
    assert_refused(refused, 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert_refused(score(service.score), 401)  # the key is checked first, replicas or not


def test_unknown_services_and_routes_are_404s(services: Services, gateway: Gateway, replicas: list[Server]) -> None:
    for url in (
        f"{gateway.url}/api/v1/service/{uuid.uuid4()}/score",
        f"{gateway.url}/api/v1/service/not-an-id/score",
        f"{gateway.url}/api/v1/service/{uuid.uuid4()}/other",
        f"{gateway.url}/",
    ):
        assert_refused(httpx.post(url, json={}), 404)
    service = services.deploy([address(replicas[0])])
    wrong_method = httpx.get(service.score, headers={"Authorization": f"Bearer {service.primary}"})
    assert_refused(wrong_method, 405)
    assert wrong_method.headers["allow"] == "POST"


def test_the_swagger_document_is_the_replicas(services: Services, replicas: list[Server]) -> None:
    service = services.deploy([address(replicas[0])])
    assert_refused(httpx.get(service.swagger), 401)
    answer = httpx.get(service.swagger, headers={"Authorization": f"Bearer {service.secondary}"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == replicas[0].request("GET", "/swagger.json").json()
    assert_safe(answer)


def test_a_body_over_the_cap_is_a_413_before_it_is_read(services: Services, replicas: list[Server]) -> None:
    service = services.deploy([address(replicas[0])], auth=False)
    url = httpx.URL(service.score)
    # The cap is 100 MiB by default: declare more, send none of it; the answer comes at once.
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(
            f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.netloc.decode()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {101 * 1024 * 1024}\r\n\r\n".encode()
        )
        received = b""
        while b"larger than" not in received and (chunk := sock.recv(65536)):  # the head and body may come apart
            received += chunk
    assert received.startswith(b"HTTP/1.1 413 "), received
    assert b"larger than" in received, received
