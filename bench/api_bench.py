"""Throughput and latency of GET and POST .../models on PostgreSQL, production settings.

Starts `mms serve` (MMS_ENV=production, JSON access logs, MMS_WORKERS processes) on a
throw-away PostgreSQL database and drives it with wrk (32 connections, a separate process).
Every run is bounded (-d seconds) and cleans up after itself.

    .venv/bin/python bench/api_bench.py [--duration 15] [--connections 32] [--workers 2]
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
MODEL = {"name": "housing.model", "tags": ["bench"], "description": "bench",
         "url": "https://example.com/housing.zip", "mimeType": "application/zip", "unpack": False}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and all its descendants, from /proc."""
    total, ticks = 0.0, os.sysconf("SC_CLK_TCK")
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pids += [int(c) for c in children]
        except FileNotFoundError:
            continue
    return total


def wrk(url: str, token: str, *, duration: int, connections: int, post_body: str | None) -> dict:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    with script:
        script.write(f'wrk.headers["Authorization"] = "Bearer {token}"\n')
        if post_body is not None:
            script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
            script.write(f"wrk.body = {json.dumps(post_body)}\n")
        script.write(
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("JSON {\\"requests\\": %d, \\"non2xx\\": %d, \\"p50\\": %d, \\"p99\\": %d}\\n",'
            " summary.requests, summary.errors.status, latency:percentile(50), latency:percentile(99)))\nend\n"
        )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "-s", script.name, url],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    ).stdout
    os.unlink(script.name)
    stats = json.loads(re.search(r"^JSON (.*)$", out, re.M).group(1))
    stats["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")

    database = f"mms_bench_{int(time.time())}"
    with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    data_dir = Path(tempfile.mkdtemp(prefix="mms-bench-"))
    env = {**os.environ, "MMS_ENV": "production", "MMS_SECRET_KEY": secrets.token_urlsafe(48),
           "MMS_DATABASE_URL": f"{PG}/{database}", "MMS_DATA_DIR": str(data_dir),
           "MMS_WORKERS": str(args.workers), "MMS_PORT": str(free_port())}
    mms = [sys.executable, "-m", "app.cli"]
    server = None
    try:
        subprocess.run([*mms, "db", "upgrade"], env=env, check=True, capture_output=True)
        creds = json.loads(subprocess.run([*mms, "admin", "bootstrap", "-o", "json"], env=env,
                                          check=True, capture_output=True, text=True).stdout)
        server = subprocess.Popen([*mms, "serve"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{env['MMS_PORT']}"
        for _ in range(150):
            try:
                httpx.get(f"{base}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        token = httpx.post(f"{base}/oauth2/token", data={"grant_type": "client_credentials",
                           "client_id": creds["clientId"], "client_secret": creds["clientSecret"]}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        account = f"{base}/api/subscriptions/bench/resourceGroups/rg/accounts/bench"
        httpx.put(account, json={"location": "eastus2", "sku": {"name": "S1"}}, headers=headers).raise_for_status()
        model = httpx.post(f"{account}/models", json=MODEL, headers=headers).json()

        print(f"{args.workers} API processes, PostgreSQL, wrk -t2 -c{args.connections} -d{args.duration}s, "
              f"{os.cpu_count()} cores")
        print(f"{'request':<28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'server CPU %':>14}")
        for label, url, body in (
            ("GET .../models/{id}", f"{account}/models/{model['id']}", None),
            ("POST .../models", f"{account}/models", json.dumps(MODEL)),
        ):
            cpu_before, started = cpu_seconds(server.pid), time.monotonic()
            stats = wrk(url, token, duration=args.duration, connections=args.connections, post_body=body)
            cpu = (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - started) * 100
            print(f"{label:<28}{stats['rps']:>9.0f}{stats['p50'] / 1000:>9.1f}{stats['p99'] / 1000:>9.1f}"
                  f"{stats['non2xx']:>9}{cpu:>14.0f}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        with psycopg.connect("host=127.0.0.1 user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
