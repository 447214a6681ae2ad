"""The data folder is the service's alone: `mms serve` and its build worker, started as a user
starts them (umask 022), make it 0700 and every file in it 0600, secrets from their first byte."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.embedded_service import free_port, wait_for
from tests.factories import account_url


def _umask_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in (p for p in Path("/proc").iterdir() if p.name.isdigit()):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def _worker_pids(server: subprocess.Popen) -> list[int]:
    pids = []
    for pid in _descendants(server.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in command:
            pids.append(pid)
    return pids


def test_the_data_folder_and_every_file_in_it_are_private(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MMS_")},
        "MMS_DATA_DIR": str(data),
        "MMS_PORT": str(port),
        "MMS_LOG_FORMAT": "text",
    }

    bootstrap = subprocess.run(
        [sys.executable, "-m", "app.cli", "admin", "bootstrap", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        umask=0o022,  # a user's usual umask: the service must not rely on a strict one
    )
    assert bootstrap.returncode == 0, bootstrap.stderr
    credentials = json.loads(bootstrap.stdout)
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve"],
        env=env,
        umask=0o022,  # a user's usual umask: the service must not rely on a strict one
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", server)
        token = httpx.post(
            f"{base}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": credentials["clientId"],
                "client_secret": credentials["clientSecret"],
            },
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        account = base + account_url("sub-files", "rg", "files")
        assert (
            httpx.put(
                account, headers=headers, json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}}
            ).status_code
            == 201
        )
        uploaded = httpx.post(
            f"{account}/assets", params={"name": "model.pkl"}, content=b"weights" * 1000, headers=headers
        )
        assert uploaded.status_code == 201, uploaded.text

        deadline = time.monotonic() + 90
        while (
            not (workers := _worker_pids(server))
            or any(_umask_of(p) != 0o077 for p in workers)
            or not (data / "broker.sqlite").exists()
        ):
            assert time.monotonic() < deadline, ("the build worker's umask", [(p, oct(_umask_of(p))) for p in workers])
            time.sleep(0.5)
        assert _umask_of(server.pid) == 0o077
    finally:
        server.terminate()
        server.wait(timeout=60)

    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = {p.relative_to(data).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*") if p.is_file()}
    for name in ("secret.key", "mms.db", "broker.sqlite"):
        assert files.pop(name) == 0o600, name
    assert any(name.startswith("assets/objects/") for name in files), files
    assert {name: oct(mode) for name, mode in files.items() if mode & 0o077} == {}
    folders = {p.relative_to(data).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in data.rglob("*") if p.is_dir()}
    assert {name: oct(mode) for name, mode in folders.items() if mode & 0o077} == {}
