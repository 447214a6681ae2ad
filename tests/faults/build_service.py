"""A real `mms serve` and `mms worker` for the build fault tests, and what they act on.

The service pushes to its own CNCF Distribution registry through a proxy (tests/registry_proxy.py)
whose ``Gate`` can hold one chosen request: that is how a test catches a build inside a given
step (reading the base image, the dependency cache, uploading a layer, putting the manifest)
without a hook in the product. A model file server that can hold its download catches a build
in its fetch step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.registry_proxy import CountingProxy
from tests.sse import Listener

SCORE = "def init():\n    pass\n\ndef run(raw_data):\n    return {'echo': raw_data}\n"
TERMINAL = {"Succeeded", "Failed", "Cancelled"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
HOLD_SECONDS = 120  # nothing is held longer, whatever a test forgets


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
    def do_GET(self) -> None:
        server: ModelFiles = self.server  # type: ignore[assignment]
        server.asked.set()
        server.held.wait(HOLD_SECONDS)
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


class Gate:
    """Holds the first registry request matching a rule, before it goes to the registry or,
    with ``answered``, after the registry answered and before the worker has the answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rule: tuple[str, re.Pattern[str], bool] | None = None
        self.reached = threading.Event()
        self._released = threading.Event()
        self._released.set()

    def hold(self, method: str, path: str, *, answered: bool = False) -> None:
        """Hold the next ``method`` request whose path (no query) matches the regex ``path``."""
        with self._lock:
            self._rule = (method, re.compile(path), answered)
            self.reached.clear()
            self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._rule = None
            self._released.set()

    def before(self, method: str, target: str) -> None:
        self._pass(method, target, answered=False)

    def after(self, method: str, target: str, status: int) -> None:
        self._pass(method, target, answered=True)

    def _pass(self, method: str, target: str, *, answered: bool) -> None:
        with self._lock:
            rule = self._rule
            caught = (
                rule is not None
                and not self.reached.is_set()
                and rule[0] == method
                and rule[2] == answered
                and rule[1].fullmatch(target.split("?", 1)[0])
            )
            if caught:
                self.reached.set()
        if caught:
            self._released.wait(HOLD_SECONDS)


@dataclass
class Service:
    api: str
    headers: dict[str, str]
    env: dict[str, str]
    log_dir: Path
    files: ModelFiles
    proxy: CountingProxy
    gate: Gate
    worker_tmp: Path  # the workers' TMPDIR, where their builds' scratch folders go
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.log_dir / f"{args[0]}-{len(self.processes)}.log", "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
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

    def pulled_digest(self, image: dict) -> str | None:
        """The digest the registry serves for the image's tag, or None when it has no such tag."""
        reference = image["ImageLocation"].split("/", 1)[1]
        repository, _, tag = reference.rpartition(":")
        answer = httpx.get(
            f"http://{self.proxy.address}/v2/{repository}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}, timeout=30
        )
        if answer.status_code == 404:
            return None
        assert answer.status_code == 200, answer.text
        return answer.headers["Docker-Content-Digest"]

    def tags(self, image: dict) -> list[str]:
        repository = image["ImageLocation"].split("/", 1)[1].rpartition(":")[0]
        answer = httpx.get(f"http://{self.proxy.address}/v2/{repository}/tags/list", timeout=30)
        assert answer.status_code == 200, answer.text
        return sorted(answer.json()["tags"] or [])


class Account:
    def __init__(self, service: Service, name: str) -> None:
        self.service = service
        self.url = f"{service.api}/api/subscriptions/faults/resourceGroups/rg/accounts/{name}"
        self.call("PUT", self.url, json={"location": "eastus2", "sku": {"name": "S1"}})
        # Where its events start: a stream's ready id (event ids are opaque, there is no "0").
        first = Listener(f"{self.url}/images/events", service.headers)
        try:
            ready = first.next()
            assert ready is not None and ready.event == "ready", ready
            self.start = ready.id
        finally:
            first.close()

    def call(self, method: str, url: str, **kwargs) -> httpx.Response:  # type: ignore[no-untyped-def]
        answer = httpx.request(method, url, headers=self.service.headers, timeout=30, **kwargs)
        assert answer.status_code < 400, f"{method} {url}: {answer.status_code} {answer.text}"
        return answer

    def held_model(self) -> str:
        """A model the service downloads from the test's file server (held or not)."""
        return self.call(
            "POST",
            f"{self.url}/models",
            json={
                "name": "held",
                "url": f"http://{self.service.files.address}/weights.bin",
                "mimeType": "application/octet-stream",
            },
        ).json()["id"]

    def manifest(self, model_ids: list[str], conda: str | None = None) -> str:
        """A manifest of the echo driver and ``model_ids``; a ``conda`` file's pip entries
        give the build an environment of its own (a dependency cache miss: an install)."""
        assets = {"score.py": SCORE, **({"env.yml": conda} if conda is not None else {})}
        urls = {
            name: self.call("POST", f"{self.url}/assets", params={"name": name}, content=text.encode()).json()["url"]
            for name, text in assets.items()
        }
        return self.call(
            "POST",
            f"{self.url}/manifests",
            json={
                "name": "echo",
                "modelIds": model_ids,
                "assets": [{"id": n, "url": u} for n, u in urls.items()],
                "entryScript": "score.py",
                "runtime": "python",
                **({"condaFile": "env.yml"} if conda is not None else {}),
            },
        ).json()["id"]

    def build(self, manifest_id: str, name: str = "echo-image") -> str:
        return self.call(
            "POST", f"{self.url}/images", json={"name": name, "manifestId": manifest_id, "imageType": "Docker"}
        ).json()["Id"]

    def image(self, image_id: str) -> dict:
        return self.call("GET", f"{self.url}/images/{image_id}").json()

    def images(self) -> list[dict]:
        return self.call("GET", f"{self.url}/images", params={"count": 100}).json()["value"]

    def log(self, image_id: str) -> str:
        return self.call("GET", f"{self.url}/images/{image_id}/log").text

    def wait_for_state(self, ids: list[str], done, seconds: float) -> list[dict]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + seconds
        while not done(images := [self.image(i) for i in ids]):
            assert time.monotonic() < deadline, (
                f"{[i['CreationState'] for i in images]} after {seconds} s:\n{self.service.logs()}"
            )
            time.sleep(0.3)
        return images

    def events(self) -> Listener:
        """The account's image events since it was made."""
        return Listener(f"{self.url}/images/events?lastEventId={self.start}", self.service.headers)


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


def scratch_left(service: Service) -> list[str]:
    """The build scratch folders in the workers' temporary folder (Python's own ``pymp-*`` of a
    killed worker's pool is not the service's), and the upload files in the data folder."""
    left = [p.name for p in service.worker_tmp.glob("mms-*")]
    left += [p.name for p in (Path(service.env["MMS_DATA_DIR"]) / "incoming").glob(".upload-*")]
    return sorted(left)


def kill_group(process: subprocess.Popen) -> None:
    """kill -9 the process and its group (a worker, its pool processes and its beat)."""
    os.killpg(process.pid, 9)
    process.wait(timeout=30)
