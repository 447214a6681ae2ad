"""The service as production runs it, for the benches: `mms serve` with MMS_ENV=production,
JSON access logs and several API processes, on a throw-away PostgreSQL database, with an
Owner signed in and an account made. Everything it starts is stopped and dropped after."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
MODEL = {
    "name": "housing.model",
    "tags": ["bench"],
    "description": "bench",
    "url": "https://example.com/housing.zip",
    "mimeType": "application/zip",
    "unpack": False,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int, *, descendants: bool = True) -> float:
    """User+system CPU of a process (and all its descendants), from /proc."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pids += [int(c) for c in children] if descendants else []
        except FileNotFoundError:
            continue
    return total


@dataclass
class Service:
    base: str
    port: int
    token: str
    account: str  # the account's URL
    server: subprocess.Popen
    build_workers: list[subprocess.Popen]
    database: str | None = None  # PostgreSQL's database name (None: SQLite)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def production_service(
    workers: int, *, sqlite: bool = False, build_workers: int = 0, **settings: str
) -> Iterator[Service]:
    """``mms serve`` with ``workers`` API processes; ``settings`` are more MMS_ variables.
    ``sqlite``: the embedded database under the data folder instead of PostgreSQL.
    ``build_workers``: that many ``mms worker`` processes (one build at a time each) on a queue of their own."""
    database = f"mms_bench_{int(time.time())}_{os.getpid()}"
    if not sqlite:
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
    data_dir = Path(tempfile.mkdtemp(prefix="mms-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "MMS_ENV": "production",
        "MMS_SECRET_KEY": secrets.token_urlsafe(48),
        "MMS_DATABASE_URL": f"sqlite:///{data_dir / 'mms.db'}" if sqlite else f"{PG}/{database}",
        "MMS_DATA_DIR": str(data_dir),
        "MMS_BROKER_URL": "redis://127.0.0.1:6379/13",
        "MMS_REGISTRY": "127.0.0.1:5000",
        "MMS_WORKERS": str(workers),
        "MMS_PORT": str(port),
        "MMS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "MMS_BUILD_QUEUE": f"mms-bench-{os.getpid()}",
        # In production the operator allows the service's own (here loopback) address to its workers.
        "MMS_FETCH_ALLOW_HOSTS": json.dumps([f"127.0.0.1:{port}"]),
        **settings,
    }
    mms = [sys.executable, "-m", "app.cli"]
    server, builders = None, []
    try:
        subprocess.run([*mms, "db", "upgrade"], env=env, check=True, capture_output=True)
        creds = json.loads(
            subprocess.run(
                [*mms, "admin", "bootstrap", "-o", "json"], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
        server_log = open(os.environ.get("MMS_BENCH_SERVER_LOG", os.devnull), "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [*mms, "serve", "--no-build-worker"],
            env=env,
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server_log.close()
        base = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        token = httpx.post(
            f"{base}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": creds["clientId"],
                "client_secret": creds["clientSecret"],
            },
        ).json()["access_token"]
        account = f"{base}/api/subscriptions/bench/resourceGroups/rg/accounts/bench"
        httpx.put(
            account, json={"location": "eastus2", "sku": {"name": "S1"}}, headers={"Authorization": f"Bearer {token}"}
        ).raise_for_status()
        for index in range(build_workers):
            with open(data_dir / f"worker-{index}.log", "wb") as log:
                builders.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "workers", "worker", "--concurrency", "1"],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield Service(base, port, token, account, server, builders, None if sqlite else database)
    finally:
        for builder in builders:
            builder.terminate()
        for builder in builders:
            try:
                builder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(builder.pid, 9)
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
        if not sqlite:
            with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        shutil.rmtree(data_dir, ignore_errors=True)


def wrk(
    url: str,
    token: str,
    *,
    duration: int,
    connections: int,
    post_body: str | None = None,
    unique: str | None = None,
    keyed: bool = False,
) -> dict:
    """wrk's figures for ``url`` (GET, or POST of ``post_body``): requests, rps, non2xx, p50 and p99 in µs.

    With ``unique``, that text of the body is replaced in each request by one no other request
    of the run sends (a model name of its own, say). With ``keyed``, each request carries an
    Idempotency-Key no other request of the run sends."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
        if post_body is not None:
            script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
            script.write(f"wrk.body = {json.dumps(post_body)}\n")
        if unique is not None or keyed:
            # Each of wrk's threads numbers its requests after a prefix of its own (and the run's).
            replaced = "wrk.body"
            if unique is not None:
                replaced = f"string.gsub(wrk.body, {json.dumps(_lua_pattern(unique))}, prefix .. counter)"
            script.write(
                "local counter = 0\n"
                f"local run = '{uuid.uuid4().hex[:8]}'\n"
                "setup = function(thread) counter = counter + 1; thread:set('prefix', 'r' .. counter .. '-') end\n"
                "request = function()\n"
                "  counter = counter + 1\n"
                f"  local body = {replaced}\n"
                "  local headers = nil\n"
                + (
                    "  headers = {}\n"
                    "  for name, value in pairs(wrk.headers) do headers[name] = value end\n"
                    "  headers['Idempotency-Key'] = run .. '-' .. prefix .. counter\n"
                    if keyed
                    else ""
                )
                + "  return wrk.format(nil, nil, headers, body)\n"
                "end\n"
            )
        script.write(
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("JSON {\\"requests\\": %d, \\"non2xx\\": %d, \\"p50\\": %d, \\"p99\\": %d}\\n",'
            " summary.requests, summary.errors.status, latency:percentile(50), latency:percentile(99)))\nend\n"
        )
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "-s", script.name, url],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    os.unlink(script.name)
    stats = json.loads(re.search(r"^JSON (.*)$", out, re.MULTILINE).group(1))
    stats["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return stats


def _lua_pattern(text: str) -> str:
    """``text`` as a Lua pattern that matches only itself."""
    return "".join("%" + char if not char.isalnum() else char for char in text)
