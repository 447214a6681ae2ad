"""Upload files a killed API process leaves behind are removed when the service next starts,
by age only: an upload another API process is receiving in the same folder is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.embedded_service import free_port, wait_for
from tests.factories import account_url


class Service:
    """`mms serve` (API only) on a shared data folder, as a process of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-build-worker"],
            env={**env, "MMS_PORT": str(self.port)},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(f"{self.base}/health", self.process)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=60)


def _held_body(chunks: int, go_on: threading.Event) -> Iterator[bytes]:
    yield b"x" * 65536
    go_on.wait(120)  # the upload is in progress until the test lets it go on
    for _ in range(chunks - 1):
        yield b"x" * 65536


def _upload_in_background(url: str, headers: dict[str, str], chunks: int, go_on: threading.Event) -> list[object]:
    """Start an upload that waits for ``go_on``; its answer (or exception) lands in the returned list."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(
                httpx.post(
                    url, params={"name": "big.bin"}, headers=headers, timeout=120, content=_held_body(chunks, go_on)
                )
            )
        except httpx.HTTPError as exc:
            result.append(exc)

    threading.Thread(target=run, daemon=True).start()
    return result


def _wait_for_uploads(incoming: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + 30
    while len(found := sorted(incoming.glob(".upload-*"))) < count:
        assert time.monotonic() < deadline, f"{count} upload file(s) never appeared: {found}"
        time.sleep(0.1)
    return found


def test_a_kill_9_mid_upload_leaves_a_file_the_next_start_removes_once_stale(tmp_path: Path) -> None:
    data, incoming = tmp_path / "data", tmp_path / "data" / "incoming"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MMS_")},
        "MMS_DATA_DIR": str(data),
        "MMS_LOG_FORMAT": "text",
        "MMS_UPLOAD_STALE_SECONDS": "60",
    }
    bootstrap = subprocess.run(
        [sys.executable, "-m", "app.cli", "admin", "bootstrap", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bootstrap.returncode == 0, bootstrap.stderr
    credentials = json.loads(bootstrap.stdout)

    killed = Service(env)
    try:
        token = httpx.post(
            f"{killed.base}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": credentials["clientId"],
                "client_secret": credentials["clientSecret"],
            },
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        path = account_url("sub-uploads", "rg", "uploads")
        assert (
            httpx.put(
                f"{killed.base}{path}",
                headers=headers,
                json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}},
            ).status_code
            == 201
        )

        # The process dies mid-upload: its file stays behind.
        _upload_in_background(f"{killed.base}{path}/assets", headers, chunks=10, go_on=threading.Event())
        [left] = _wait_for_uploads(incoming, 1)
        killed.stop(signal.SIGKILL)
        assert left.exists()
    finally:
        killed.stop(signal.SIGKILL)
    old = time.time() - 120
    os.utime(left, (old, old))
    recent = incoming / ".upload-recent"  # a dead process's too, but not old enough to be sure
    recent.write_bytes(b"x")
    os.utime(recent, (time.time() - 30, time.time() - 30))

    # Another API process sharing the folder is receiving an upload while this one starts.
    done = threading.Event()
    with (incoming / ".upload-in-progress").open("wb") as writing:

        def write() -> None:
            while not done.is_set():
                writing.write(b"x" * 4096)
                writing.flush()
                time.sleep(0.2)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            Service(env).stop()
        finally:
            done.set()
            writer.join(5)
    assert sorted(p.name for p in incoming.iterdir()) == [".upload-in-progress", ".upload-recent"]
