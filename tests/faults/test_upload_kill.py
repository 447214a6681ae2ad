"""`mms serve` kill -9'd with a large chunked upload in flight, on the suite's PostgreSQL.

The killed process leaves its half-received file in the upload folder and nothing else: no
asset row, nothing in the asset store. The next start removes the file once it is older than
MMS_UPLOAD_STALE_SECONDS (60 here; the test ages the file rather than wait a minute, as the
folder may be shared with live API processes the sweep goes by age alone). The same upload
sent again succeeds once: one asset, one stored file, the bytes that were sent.
"""

from __future__ import annotations

import hashlib
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
import psycopg

from tests.embedded_service import wait_for
from tests.faults.conftest import PostgresCluster, mms, service_env

PIECE = b"m" * (1 << 20)
PIECES = 64  # a 64 MiB model file


def _serve(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-build-worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_for(f"http://127.0.0.1:{env['MMS_PORT']}/health", server)
    return server


def _kill(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def _body(held: threading.Event | None = None) -> Iterator[bytes]:
    """The file in 1 MiB chunks (no Content-Length: chunked); with ``held``, a quarter of it, then a wait."""
    for number in range(PIECES):
        if held is not None and number == PIECES // 4:
            held.wait(60)
            return
        yield PIECE


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _asset_rows(database_url: str) -> int:
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, connect_timeout=10) as connection:
        return connection.execute("SELECT count(*) FROM assets").fetchone()[0]


def test_an_api_killed_mid_upload_leaves_no_asset_and_the_retried_upload_succeeds_once(
    postgres_cluster: PostgresCluster,
    tmp_path: Path,
) -> None:
    database_url = postgres_cluster.create_database()
    data = tmp_path / "data"
    env = service_env(data, database_url, MMS_UPLOAD_STALE_SECONDS="60")
    mms(env, "db", "upgrade")
    owner = json.loads(mms(env, "admin", "bootstrap", "-o", "json").stdout)
    api = f"http://127.0.0.1:{env['MMS_PORT']}"
    incoming, stored = data / "incoming", data / "assets" / "objects"  # the local asset store's files
    held = threading.Event()
    server = _serve(env, tmp_path / "serve.log")
    try:
        token = httpx.post(
            f"{api}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": owner["clientId"],
                "client_secret": owner["clientSecret"],
            },
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        account = f"{api}/api/subscriptions/faults/resourceGroups/rg/accounts/upload-kill"
        assert (
            httpx.put(account, headers=headers, json={"location": "eastus2", "sku": {"name": "S1"}}).status_code == 201
        )

        def upload() -> None:
            try:
                httpx.post(
                    f"{account}/assets", params={"name": "model.bin"}, headers=headers, content=_body(held), timeout=60
                )
            except httpx.HTTPError:
                pass  # the server died under it

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        deadline = time.monotonic() + 30
        while not [p for p in incoming.glob(".upload-*") if p.stat().st_size >= (PIECES // 4 - 1) * len(PIECE)]:
            assert time.monotonic() < deadline, f"the upload never got a quarter in: {list(incoming.glob('*'))}"
            time.sleep(0.05)
        _kill(server)
        held.set()
        uploader.join(30)

        [partial] = incoming.glob(".upload-*")
        assert 0 < partial.stat().st_size < PIECES * len(PIECE)
        assert _asset_rows(database_url) == 0, "a half-received upload was recorded"
        assert _files(stored) == [], "a half-received upload was stored"

        aged = time.time() - 120  # older than MMS_UPLOAD_STALE_SECONDS: a dead process's
        os.utime(partial, (aged, aged))
        server = _serve(env, tmp_path / "serve.log")
        assert not partial.exists(), "the next start left the killed upload's file"

        again = httpx.post(
            f"{account}/assets", params={"name": "model.bin"}, headers=headers, content=_body(), timeout=120
        )
        assert again.status_code == 201, again.text
        asset = again.json()
        whole = hashlib.sha256(PIECE * PIECES).hexdigest()
        assert (asset["size"], asset["sha256"]) == (PIECES * len(PIECE), whole)
        assert _asset_rows(database_url) == 1
        [kept] = _files(stored)
        assert kept.stat().st_size == PIECES * len(PIECE)
        assert list(incoming.glob(".upload-*")) == []
        read = httpx.get(asset["url"], timeout=60)
        assert read.status_code == 200 and hashlib.sha256(read.content).hexdigest() == whole
    finally:
        held.set()
        _kill(server)
