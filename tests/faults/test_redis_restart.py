"""Redis restarted (killed, started empty: `--save ''`) with builds queued, while a real
`mms worker` (oci builder, the service's own image store) is busy with the first of them.

The queued messages are gone, so is the running build's unacknowledged one; the database is
the truth: every build must still end Succeeded within a bounded time, each under its own
version, none left NotStarted or Running, and the events must tell exactly that story.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.embedded_service import HOST_CA_BUNDLE, wait_for
from tests.faults.conftest import PostgresCluster, RedisServer, mms, service_env
from tests.sse import Listener

BUILDS = 3
SCORE = "def init():\n    pass\n\ndef run(raw_data):\n    return {'echo': raw_data}\n"
# From the restart: the reaper re-sends a build still NotStarted after MMS_BUILD_REPUBLISH_SECONDS
# (5 here, checked every 5 s), and each build takes seconds once the first has cached its
# Python dependencies.
DEADLINE_AFTER_RESTART = 150


@dataclass
class Service:
    api: str
    headers: dict[str, str]
    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen]

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{args[0]}-{len(self.processes)}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture()
def service(postgres_cluster: PostgresCluster, redis_server: RedisServer, rootfs_tar: Path,
            tmp_path: Path) -> Iterator[Service]:
    env = service_env(tmp_path / "data", postgres_cluster.create_database(),
                      MMS_BROKER_URL=redis_server.url, MMS_BUILD_QUEUE="mms-fault-builds",
                      MMS_BUILD_LEASE_SECONDS="6", MMS_BUILD_REPUBLISH_SECONDS="5")
    if HOST_CA_BUNDLE.is_file():  # this machine reaches PyPI through a TLS-inspecting proxy
        env["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    mms(env, "db", "upgrade")
    mms(env, "base-image", "publish", "--rootfs-tar", str(rootfs_tar))
    owner = json.loads(mms(env, "admin", "bootstrap", "-o", "json").stdout)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    service = Service(api=f"http://127.0.0.1:{env['MMS_PORT']}", headers={}, env=env, log_dir=log_dir,
                      processes=[])
    try:
        wait_for(f"{service.api}/health", service.start("serve"))
        token = httpx.post(f"{service.api}/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": owner["clientId"],
            "client_secret": owner["clientSecret"]}).json()["access_token"]
        service.headers = {"Authorization": f"Bearer {token}"}
        yield service
    finally:
        for process in service.processes:
            if process.poll() is None:
                process.terminate()
        for process in service.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def test_builds_queued_when_redis_restarts_all_finish_once_and_the_events_say_so(
    service: Service, redis_server: RedisServer,
) -> None:
    def call(method: str, url: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        answer = httpx.request(method, url, headers=service.headers, timeout=30, **kwargs)
        assert answer.status_code < 400, f"{method} {url}: {answer.status_code} {answer.text}"
        return answer

    account = f"{service.api}/api/subscriptions/faults/resourceGroups/rg/accounts/redis-restart"
    call("PUT", account, json={"location": "eastus2", "sku": {"name": "S1"}})
    score = call("POST", f"{account}/assets", params={"name": "score.py"}, content=SCORE.encode()).json()["url"]
    manifest = call("POST", f"{account}/manifests", json={
        "name": "echo", "modelIds": [], "assets": [{"id": "score.py", "url": score}],
        "entryScript": "score.py", "runtime": "python"}).json()["id"]
    events = Listener(f"{account}/images/events?lastEventId=0", service.headers)
    try:
        service.start("worker", "--concurrency", "1")
        images = [call("POST", f"{account}/images", json={"name": "echo-image", "manifestId": manifest,
                                                           "imageType": "Docker"}).json()
                  for _ in range(BUILDS)]
        ids = [image["Id"] for image in images]

        def states() -> list[str]:
            return [call("GET", f"{account}/images/{i}").json()["CreationState"] for i in ids]

        deadline = time.monotonic() + 120
        while "Running" not in states():
            assert time.monotonic() < deadline, f"no build started in 120 s:\n{service.logs()}"
            time.sleep(0.3)
        queue = redis.Redis(port=redis_server.port)
        assert queue.llen("mms-fault-builds") >= 1, "the other builds' messages should be waiting in Redis"

        redis_server.restart()  # the queue and the unacknowledged message are gone
        assert queue.llen("mms-fault-builds") == 0
        restarted = time.monotonic()
        while not set(now := states()) <= {"Succeeded", "Failed", "Cancelled"}:
            assert time.monotonic() - restarted < DEADLINE_AFTER_RESTART, \
                f"builds {now} {DEADLINE_AFTER_RESTART} s after Redis restarted:\n{service.logs()}"
            time.sleep(1)
        finished = [call("GET", f"{account}/images/{i}").json() for i in ids]
        assert [image["CreationState"] for image in finished] == ["Succeeded"] * BUILDS, \
            [(image["CreationState"], image.get("Error")) for image in finished]
        assert sorted(image["Version"] for image in finished) == list(range(1, BUILDS + 1))
        assert len({image["ImageLocation"] for image in finished}) == BUILDS
        for image in finished:  # each tag pullable from the service's own store
            tag = image["ImageLocation"].split("/", 1)[1].replace(":", "/manifests/")
            pulled = httpx.get(f"{service.api}/v2/{tag}", headers={
                **service.headers, "Accept": "application/vnd.oci.image.manifest.v1+json"})
            assert pulled.status_code == 200, pulled.text

        # The events: each build NotStarted, then Running, then Succeeded, and nothing else
        # (a re-sent message whose build another delivery already claimed changes nothing).
        told: dict[str, list[str]] = {i: [] for i in ids}
        deadline = time.monotonic() + 30
        while any(seen[-1:] != ["Succeeded"] for seen in told.values()):
            frame = events.next(timeout=max(0.1, deadline - time.monotonic()))
            assert frame is not None, f"the event stream ended: {told}"
            if frame.event == "image":
                image = json.loads(frame.data)["image"]
                told.setdefault(image["Id"], []).append(image["CreationState"])
        assert told == {i: ["NotStarted", "Running", "Succeeded"] for i in ids}, told
    finally:
        events.close()
