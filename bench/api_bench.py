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
import shutil
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from production import MODEL, cpu_seconds, production_service, wrk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")

    with production_service(args.workers) as service:
        account, token = service.account, service.token
        model = httpx.post(f"{account}/models", json=MODEL, headers=service.headers).json()

        print(
            f"{args.workers} API processes, PostgreSQL, wrk -t2 -c{args.connections} -d{args.duration}s, "
            f"{os.cpu_count()} cores"
        )
        print(f"{'request':<28}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'server CPU %':>14}")
        for label, url, body in (
            ("GET .../models/{id}", f"{account}/models/{model['id']}", None),
            ("POST .../models", f"{account}/models", json.dumps(MODEL)),
        ):
            cpu_before, started = cpu_seconds(service.server.pid), time.monotonic()
            stats = wrk(url, token, duration=args.duration, connections=args.connections, post_body=body)
            cpu = (cpu_seconds(service.server.pid) - cpu_before) / (time.monotonic() - started) * 100
            print(
                f"{label:<28}{stats['rps']:>9.0f}{stats['p50'] / 1000:>9.1f}{stats['p99'] / 1000:>9.1f}"
                f"{stats['non2xx']:>9}{cpu:>14.0f}"
            )


if __name__ == "__main__":
    main()
