"""Builds under faults, with a real `mms serve`, a real `mms worker` (oci builder, the service's
own image store), the suite's own PostgreSQL and Redis.

- Redis restarted (killed, started empty: `--save ''`) with builds queued and one running:
  the queued messages are gone, so is the running build's unacknowledged one.
- The worker kill -9'd while its build fetches the model: its lease lapses.
- PostgreSQL restarted while a build fetches the model: the worker's heartbeat and writes meet
  a dropped connection.

The database is the truth: every build must still end Succeeded within a bounded time, each
under its own version, none left NotStarted or Running, and the events must tell exactly
what happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.embedded_service import HOST_CA_BUNDLE, wait_for
from tests.faults.conftest import PostgresCluster, RedisServer, mms, service_env
from tests.sse import Listener

QUEUE = "mms-fault-builds"
SCORE = "def init():\n    pass\n\ndef run(raw_data):\n    return {'echo': raw_data}\n"
# The reaper runs every 5 s: it re-sends a build still NotStarted after
# MMS_BUILD_REPUBLISH_SECONDS (5 here) and re-queues one whose lease (6 s) lapsed; a build
# takes seconds once the first has cached its Python dependencies.
DEADLINE = 150
TERMINAL = {"Succeeded", "Failed", "Cancelled"}


class ModelFiles(ThreadingHTTPServer):
    """Serves a model file; while ``held`` is clear a download waits (a build stays in its fetch step)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ModelFile)
        self.asked = threading.Event()
        self.held = threading.Event()
        self.held.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _ModelFile(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        server: ModelFiles = self.server  # type: ignore[assignment]
        server.asked.set()
        server.held.wait(60)
        body = b"weights"
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the worker that asked was killed
            pass

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Service:
    api: str
    headers: dict[str, str]
    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen]
    files: ModelFiles

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{args[0]}-{len(self.processes)}.log", "wb") as log:
            process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=self.env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def stop_workers(self) -> None:
        """SIGTERM the workers still running (no build runs by then), as `docker stop` would."""
        workers = [p for p in self.processes if "worker" in p.args and p.poll() is None]
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=60)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("*.log")))


@pytest.fixture(scope="module")
def service(postgres_cluster: PostgresCluster, redis_server: RedisServer, rootfs_tar: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    files = ModelFiles()
    threading.Thread(target=files.serve_forever, args=(0.05,), daemon=True).start()
    env = service_env(tmp_path_factory.mktemp("fault-builds"), postgres_cluster.create_database(),
                      MMS_BROKER_URL=redis_server.url, MMS_BUILD_QUEUE=QUEUE,
                      MMS_BUILD_LEASE_SECONDS="6", MMS_BUILD_REPUBLISH_SECONDS="5",
                      MMS_FETCH_ALLOW_HOSTS=json.dumps([files.address]))
    if HOST_CA_BUNDLE.is_file():  # this machine reaches PyPI through a TLS-inspecting proxy
        env["MMS_EXTRA_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    mms(env, "db", "upgrade")
    mms(env, "base-image", "publish", "--rootfs-tar", str(rootfs_tar))
    owner = json.loads(mms(env, "admin", "bootstrap", "-o", "json").stdout)
    service = Service(api=f"http://127.0.0.1:{env['MMS_PORT']}", headers={}, env=env,
                      log_dir=tmp_path_factory.mktemp("fault-builds-logs"), processes=[], files=files)
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
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        files.held.set()
        files.shutdown()
        files.server_close()


class Account:
    def __init__(self, service: Service, name: str) -> None:
        self.service = service
        self.url = f"{service.api}/api/subscriptions/faults/resourceGroups/rg/accounts/{name}"
        self.call("PUT", self.url, json={"location": "eastus2", "sku": {"name": "S1"}})

    def call(self, method: str, url: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        answer = httpx.request(method, url, headers=self.service.headers, timeout=30, **kwargs)
        assert answer.status_code < 400, f"{method} {url}: {answer.status_code} {answer.text}"
        return answer

    def manifest(self, model_ids: list[str]) -> str:
        score = self.call("POST", f"{self.url}/assets", params={"name": "score.py"}, content=SCORE.encode())
        return self.call("POST", f"{self.url}/manifests", json={
            "name": "echo", "modelIds": model_ids, "assets": [{"id": "score.py", "url": score.json()["url"]}],
            "entryScript": "score.py", "runtime": "python"}).json()["id"]

    def build(self, manifest_id: str) -> str:
        return self.call("POST", f"{self.url}/images", json={
            "name": "echo-image", "manifestId": manifest_id, "imageType": "Docker"}).json()["Id"]

    def image(self, image_id: str) -> dict:
        return self.call("GET", f"{self.url}/images/{image_id}").json()

    def wait_for_state(self, ids: list[str], done, seconds: float) -> list[dict]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + seconds
        while not done(images := [self.image(i) for i in ids]):
            assert time.monotonic() < deadline, \
                f"{[i['CreationState'] for i in images]} after {seconds} s:\n{self.service.logs()}"
            time.sleep(0.3)
        return images

    def events(self) -> Listener:
        return Listener(f"{self.url}/images/events?lastEventId=0", self.service.headers)


def states_told(events: Listener, ids: list[str], seconds: float = 30) -> dict[str, list[str]]:
    """Each build's states as the event stream tells them, once each has told Succeeded or Failed."""
    told: dict[str, list[str]] = {i: [] for i in ids}
    deadline = time.monotonic() + seconds
    while any(seen[-1:] not in (["Succeeded"], ["Failed"]) for seen in told.values()):
        frame = events.next(timeout=max(0.1, deadline - time.monotonic()))
        assert frame is not None, f"the event stream ended: {told}"
        if frame.event == "image":
            image = json.loads(frame.data)["image"]
            told.setdefault(image["Id"], []).append(image["CreationState"])
    return told


def test_builds_queued_when_redis_restarts_all_finish_once_and_the_events_say_so(
    service: Service, redis_server: RedisServer,
) -> None:
    account = Account(service, "redis-restart")
    manifest = account.manifest([])
    events = account.events()
    service.start("worker", "--concurrency", "1")
    try:
        ids = [account.build(manifest) for _ in range(3)]
        account.wait_for_state(ids, lambda images: any(i["CreationState"] == "Running" for i in images), 120)
        waiting = redis_server.queue_length(QUEUE)
        redis_server.restart()  # the queue and the running build's unacknowledged message are gone
        assert waiting >= 1, "the other builds' messages should have been waiting in Redis"
        assert redis_server.queue_length(QUEUE) == 0

        finished = account.wait_for_state(
            ids, lambda images: {i["CreationState"] for i in images} <= TERMINAL, DEADLINE)
        assert [i["CreationState"] for i in finished] == ["Succeeded"] * 3, [i.get("Error") for i in finished]
        assert sorted(i["Version"] for i in finished) == [1, 2, 3]
        for image in finished:  # each tag pullable from the service's own store
            tag = image["ImageLocation"].split("/", 1)[1].replace(":", "/manifests/")
            assert httpx.get(f"{service.api}/v2/{tag}", headers=service.headers).status_code == 200
        # A re-sent message whose build was already claimed or done changes nothing.
        assert states_told(events, ids) == {i: ["NotStarted", "Running", "Succeeded"] for i in ids}
    finally:
        events.close()
        service.stop_workers()


def test_a_worker_killed_mid_build_loses_its_lease_and_the_build_is_retried(service: Service) -> None:
    account = Account(service, "worker-kill")
    model = account.call("POST", f"{account.url}/models", json={
        "name": "held", "url": f"http://{service.files.address}/weights.bin",
        "mimeType": "application/octet-stream"}).json()["id"]
    manifest = account.manifest([model])
    events = account.events()
    victim = service.start("worker", "--concurrency", "1")
    try:
        service.files.asked.clear()
        service.files.held.clear()
        image_id = account.build(manifest)
        assert service.files.asked.wait(120), f"the build never fetched its model:\n{service.logs()}"
        assert account.image(image_id)["CreationState"] == "Running"
        os.killpg(victim.pid, signal.SIGKILL)  # the worker, its pool process and its beat, mid-fetch
        victim.wait(timeout=30)
        service.files.held.set()
        killed = time.monotonic()
        service.start("worker", "--concurrency", "1")

        [image] = account.wait_for_state([image_id], lambda i: i[0]["CreationState"] in TERMINAL, DEADLINE)
        log = account.call("GET", f"{account.url}/images/{image_id}/log").text
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "build attempt 2" in log, log[-3000:]
        assert time.monotonic() - killed < DEADLINE
        assert states_told(events, [image_id]) == {
            image_id: ["NotStarted", "Running", "NotStarted", "Running", "Succeeded"]}
    finally:
        events.close()
        service.files.held.set()
        service.stop_workers()


def test_a_postgres_restart_mid_build_leaves_it_to_finish_and_the_events_tell_it(
    service: Service, postgres_cluster: PostgresCluster,
) -> None:
    account = Account(service, "pg-mid-build")
    model = account.call("POST", f"{account.url}/models", json={
        "name": "held", "url": f"http://{service.files.address}/weights.bin",
        "mimeType": "application/octet-stream"}).json()["id"]
    manifest = account.manifest([model])
    events = account.events()
    service.start("worker", "--concurrency", "1")
    try:
        service.files.asked.clear()
        service.files.held.clear()
        image_id = account.build(manifest)
        assert service.files.asked.wait(120), f"the build never fetched its model:\n{service.logs()}"
        postgres_cluster.restart()
        service.files.held.set()

        [image] = account.wait_for_state([image_id], lambda i: i[0]["CreationState"] in TERMINAL, DEADLINE)
        log = account.call("GET", f"{account.url}/images/{image_id}/log").text
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "request.unhandled_error" not in service.logs()
        told = states_told(events, [image_id])[image_id]
        # Whether the restart outlasted the lease or not, the story ends as the image does,
        # and every Running follows a NotStarted.
        assert told[0] == "NotStarted" and told[-1] == "Succeeded", told
        assert told in (["NotStarted", "Running", "Succeeded"],
                        ["NotStarted", "Running", "NotStarted", "Running", "Succeeded"]), told
        assert ("build attempt 2" in log) == (len(told) == 5), log[-3000:]
    finally:
        events.close()
        service.files.held.set()
        service.stop_workers()
