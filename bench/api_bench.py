"""Throughput and latency of GET and POST .../models on PostgreSQL, production settings.

Starts `mms serve` (MMS_ENV=production, JSON access logs, MMS_WORKERS processes) on a
throw-away PostgreSQL database and drives it with wrk (32 connections, a separate process).
GET /health, which reads nothing, is measured the same way beside them: at 32 connections a
request's mean latency is 32 / req/s (Little's law), so /health's row is the floor on this
machine. POST is measured twice: every request registering the same name (each waits on
that name's version counter from its claim to its COMMIT, so they run one at a time in the
database) and each request a name of its own, as many clients registering their models do;
then a name each with an Idempotency-Key each, as the client sends them.
Each run is bounded (-d seconds) and cleans up after itself; with --runs the medians
of the runs come last.

    .venv/bin/python bench/api_bench.py [--duration 15] [--connections 32] [--workers 2] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")

    print(
        f"{args.workers} API processes, PostgreSQL, wrk -t2 -c{args.connections} -d{args.duration}s, "
        f"{os.cpu_count()} cores"
    )
    runs = []
    for run in range(args.runs):
        print(f"run {run + 1}")
        runs.append(one_run(args))
    if args.runs > 1:
        print(f"median of {args.runs} runs")
        _header()
        for label in runs[0]:
            _row(label, {key: statistics.median(run[label][key] for run in runs) for key in runs[0][label]})


def one_run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    results = {}
    with production_service(args.workers) as service:
        account = service.account
        model = httpx.post(f"{account}/models", json=MODEL, headers=service.headers).json()
        _header()
        for label, url, body, unique, keyed in (
            ("GET /health", f"{service.base}/health", None, None, False),
            ("GET .../models/{id}", f"{account}/models/{model['id']}", None, None, False),
            ("POST .../models, one name", f"{account}/models", json.dumps(MODEL), None, False),
            ("POST .../models, a name each", f"{account}/models", json.dumps(MODEL), MODEL["name"], False),
            # What mms and the SDK send: an Idempotency-Key of its own on each registration.
            ("POST .../models, a name each, keyed", f"{account}/models", json.dumps(MODEL), MODEL["name"], True),
        ):
            cpu_before, started = cpu_seconds(service.server.pid), time.monotonic()
            stats = wrk(
                url,
                service.token,
                duration=args.duration,
                connections=args.connections,
                post_body=body,
                unique=unique,
                keyed=keyed,
            )
            stats["cpu"] = (cpu_seconds(service.server.pid) - cpu_before) / (time.monotonic() - started) * 100
            results[label] = stats
            _row(label, stats)
    return results


def _header() -> None:
    print(f"{'request':<38}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}{'server CPU %':>14}")


def _row(label: str, stats: dict[str, float]) -> None:
    print(
        f"{label:<38}{stats['rps']:>9.0f}{stats['p50'] / 1000:>9.1f}{stats['p99'] / 1000:>9.1f}"
        f"{stats['non2xx']:>9.0f}{stats['cpu']:>14.0f}"
    )


if __name__ == "__main__":
    main()
