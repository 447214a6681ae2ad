"""PostgreSQL restarted (`pg_ctl restart -m fast`) while a real `mms serve` takes concurrent
registrations under one name.

Every answer is a success or a clean 503 saying to retry (never a 500); retried with their
Idempotency-Key, the registrations end up as versions 1..N, one each, no duplicate and no gap.
Sent without a key (each then a statement committed alone, app.writes.LoopWrites), the
versions are still 1..M with no gap, every success among them and at most one for each 503 (a
commit whose answer was lost). The same server process answers normally afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.embedded_service import wait_for
from tests.faults.conftest import PostgresCluster, mms, service_env

NAME = "restart.model"
CLIENTS = 6


@pytest.fixture()
def served(postgres_cluster: PostgresCluster, tmp_path: Path):  # type: ignore[no-untyped-def]
    env = service_env(tmp_path / "data", postgres_cluster.create_database(), MMS_DB_POOL_TIMEOUT_SECONDS="5")
    mms(env, "db", "upgrade")
    owner = json.loads(mms(env, "admin", "bootstrap", "-o", "json").stdout)
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-build-worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{env['MMS_PORT']}"
    try:
        wait_for(f"{api}/health", server)
        token = httpx.post(
            f"{api}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": owner["clientId"],
                "client_secret": owner["clientSecret"],
            },
        ).json()["access_token"]
        yield api, {"Authorization": f"Bearer {token}"}, server, tmp_path / "serve.log"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


@pytest.mark.parametrize("keyed", [True, False], ids=["with-keys", "without-keys"])
def test_registrations_across_a_postgres_restart_get_versions_1_to_n_and_no_500(
    served,
    postgres_cluster: PostgresCluster,  # type: ignore[no-untyped-def]
    keyed: bool,
) -> None:
    api, headers, server, server_log = served
    account = f"{api}/api/subscriptions/faults/resourceGroups/rg/accounts/pg-restart"
    assert httpx.put(account, headers=headers, json={"location": "eastus2", "sku": {"name": "S1"}}).status_code == 201
    body = {"name": NAME, "url": "https://example.com/model.zip", "mimeType": "application/zip"}
    first: dict[str, httpx.Response] = {}  # Idempotency-Key -> the first answer
    lock = threading.Lock()
    stopping = threading.Event()

    def register(key: str) -> httpx.Response:
        sent = {**headers, "Idempotency-Key": key} if keyed else headers
        return httpx.post(f"{account}/models", headers=sent, json=body, timeout=30)

    def client() -> None:
        while not stopping.is_set():
            key = uuid.uuid4().hex
            answer = register(key)
            with lock:
                first[key] = answer

    # GETs beside them (app.reads): a page (the thread pool) and one model (the driver alone, on
    # the event loop): (started at, answer or what it raised).
    reads: list[tuple[float, httpx.Response | Exception]] = []
    first["known"] = register("known")  # among the versions counted below
    known = first["known"].json()["id"]

    def reader(url: str, params: dict[str, str | int]) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                answer: httpx.Response | Exception = httpx.get(url, headers=headers, params=params, timeout=30)
            except httpx.HTTPError as error:
                answer = error
            reads.append((started, answer))

    clients = [threading.Thread(target=client) for _ in range(CLIENTS)] + [
        threading.Thread(target=reader, args=(f"{account}/models", {"name": NAME, "count": 5})),
        threading.Thread(target=reader, args=(f"{account}/models/{known}", {})),
    ]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1.5)  # registrations flowing
        postgres_cluster.restart()
        restarted = time.monotonic()
        time.sleep(1.5)  # and flowing again
    finally:
        stopping.set()
        for thread in clients:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in clients), "a registration did not answer within 60 s"

    statuses = sorted({answer.status_code for answer in first.values()})
    refused = [answer for answer in first.values() if answer.status_code != 200]
    assert set(statuses) <= {200, 503}, [(a.status_code, a.text) for a in refused if a.status_code != 503][:3]
    assert refused, f"no registration met the restart ({len(first)} answered 200): the fault never hit"
    for answer in refused:
        error = answer.json()
        assert error["code"] == "DatabaseUnavailable" and error["statusCode"] == 503, error
        assert "retry" in error["message"] and answer.headers["Retry-After"].isdigit(), error
    assert "request.unhandled_error" not in server_log.read_text(errors="replace")  # the 500 path
    answers = [answer for _, answer in reads]
    assert all(isinstance(a, httpx.Response) and a.status_code in (200, 503) for a in answers), [
        a if isinstance(a, Exception) else a.text
        for a in answers
        if not isinstance(a, httpx.Response) or a.status_code != 200
    ][:3]
    assert all(a.json()["code"] == "DatabaseUnavailable" for a in answers if a.status_code == 503)  # type: ignore[union-attr]
    for kind in ("models?", f"models/{known}"):  # each reader read after the restart
        assert any(
            started > restarted and a.status_code == 200 and kind in str(a.url)  # type: ignore[union-attr]
            for started, a in reads
        ), f"no read of {kind} after the restart"

    versions: dict[str, int] = {k: a.json()["version"] for k, a in first.items() if a.status_code == 200}
    if keyed:
        # The client's side of a 503: retry with the same key. A registration the database did
        # commit before the connection dropped is replayed, never registered twice.
        deadline = time.monotonic() + 60
        for key in [k for k, a in first.items() if a.status_code != 200]:
            while True:
                answer = register(key)
                if answer.status_code == 200:
                    versions[key] = answer.json()["version"]
                    break
                assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
                time.sleep(0.5)
    listed = httpx.get(f"{account}/models", headers=headers, params={"name": NAME, "count": 1000}).json()
    assert listed.get("nextLink") is None
    total = len(listed["value"])
    assert sorted(m["version"] for m in listed["value"]) == list(range(1, total + 1))  # no gap, no duplicate
    assert sorted(versions.values()) == sorted(set(versions.values()))
    by_version = {m["version"]: m["id"] for m in listed["value"]}
    assert all(
        by_version[first[k].json()["version"]] == first[k].json()["id"] for k in first if first[k].status_code == 200
    )
    if keyed:
        assert sorted(versions.values()) == list(range(1, len(first) + 1)), sorted(versions.values())
    else:  # each 503 committed or not: a version at most for each
        assert len(versions) <= total <= len(first), (len(versions), total, len(first))

    # The same process, never restarted, answers normally.
    assert server.poll() is None
    assert httpx.get(f"{api}/ready").json()["checks"]["database"] == "ok"
    again = register(uuid.uuid4().hex)
    assert again.status_code == 200 and again.json()["version"] == total + 1, again.text
