"""What a request costs next to an empty one: GET and POST .../models against GET /health.

One API process, one connection (wrk -c1), production settings, on PostgreSQL and on the
embedded SQLite database. Each run measures /health, an authenticated GET of a model and a
POST of a model in turn, in the same process; the ratio of their p50 latencies to /health's
is the figure (issue 20: GET at most 2x, POST at most 4x). Prints each run and the medians.

Within a run the three are measured in interleaved rounds (``--rounds``), each ratio against the
/health measured just before it, so a machine whose speed drifts moves both sides of a ratio.

On PostgreSQL each run also measures the floor under those figures, with psycopg alone (no
service) on the same database: one indexed read, and one durable write (an INSERT and its
COMMIT, which waits for the WAL to reach the disk: a registration cannot answer before it).

    .venv/bin/python bench/request_cost_bench.py [--runs 3] [--duration 5] [--rounds 5] [--database both]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from production import MODEL, production_service, wrk


def one_run(sqlite: bool, duration: int, rounds: int) -> dict[str, dict]:
    """Each request's p50 and its ratio to /health's, measured in ``rounds`` interleaved rounds
    (/health, GET, POST, /health, GET, ...; ``duration`` seconds each in all): a machine whose
    speed drifts within a run moves all three, not one of them. A round's ratio compares a
    request with the /health measured just before it; the run's figures are the rounds' medians."""
    with production_service(1, sqlite=sqlite) as service:
        model = httpx.post(f"{service.account}/models", json=MODEL, headers=service.headers).json()
        urls = {
            "GET /health": (f"{service.base}/health", None),
            "GET .../models/{id}": (f"{service.account}/models/{model['id']}", None),
            "POST .../models": (f"{service.account}/models", json.dumps(MODEL)),
            # What the client sends: a key of its own, so the registration and the key's record
            # commit together (a transaction, not the statement alone).
            "POST .../models, keyed": (f"{service.account}/models", json.dumps(MODEL)),
        }
        keyed = {"POST .../models, keyed"}
        for label, (url, body) in urls.items():  # warm: imports, pools, caches
            wrk(url, service.token, duration=1, connections=1, post_body=body, keyed=label in keyed)
        slice_seconds = max(1, round(duration / rounds))
        measured: dict[str, list[dict]] = {label: [] for label in urls}
        for _ in range(rounds):
            for label, (url, body) in urls.items():
                measured[label].append(
                    wrk(url, service.token, duration=slice_seconds, connections=1, post_body=body, keyed=label in keyed)
                )
        health = [figures["p50"] for figures in measured["GET /health"]]
        results = {
            label: {
                "p50": statistics.median(figures["p50"] for figures in rounds_of),
                "rps": statistics.median(figures["rps"] for figures in rounds_of),
                "ratio": statistics.median(figures["p50"] / h for figures, h in zip(rounds_of, health, strict=True)),
            }
            for label, rounds_of in measured.items()
        }
        if service.database:
            results |= floors(service.database, model["id"])
        return results


def floors(database: str, model_id: str, count: int = 2000) -> dict[str, dict]:
    """psycopg alone on the service's database: a model's row by id (autocommit), and an INSERT
    with its COMMIT (durable: synchronous_commit as the server has it); p50 in µs, as wrk's."""
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={database}") as conn:
        conn.execute("CREATE TABLE bench_floor (id bigserial PRIMARY KEY, note text)")
        conn.commit()

        def read() -> None:
            conn.execute("SELECT * FROM model_versions WHERE id = %s", (model_id,)).fetchall()

        def write() -> None:
            conn.execute("INSERT INTO bench_floor (note) VALUES (%s)", ("bench",))
            conn.commit()

        conn.autocommit = True
        read_p50 = _p50(read, count)
        conn.autocommit = False
        write_p50 = _p50(write, count)
    return {
        "floor: a read (psycopg)": {"p50": read_p50, "rps": 1e6 / read_p50},
        "floor: INSERT+COMMIT": {"p50": write_p50, "rps": 1e6 / write_p50},
    }


def _p50(call: Callable[[], None], count: int) -> float:
    for _ in range(count // 10):
        call()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds of each request per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per run")
    parser.add_argument("--database", choices=["postgresql", "sqlite", "both"], default="both")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install -y wrk")
    databases = ["postgresql", "sqlite"] if args.database == "both" else [args.database]
    print("1 API process, 1 connection (wrk -c1), production settings; p50 in ms, ratio to /health's p50")
    for database in databases:
        runs = [one_run(database == "sqlite", args.duration, args.rounds) for _ in range(args.runs)]
        print(f"\n{database}")
        print(f"{'request':<24}" + "".join(f"{f'run {i + 1}':>18}" for i in range(len(runs))) + f"{'median':>18}")
        for label in runs[0]:
            cells, ratios = [], []
            for run in runs:
                ratio = run[label].get("ratio", run[label]["p50"] / run["GET /health"]["p50"])
                ratios.append(ratio)
                cells.append(f"{run[label]['p50'] / 1000:.2f} ms {ratio:.1f}x")
            p50 = statistics.median(run[label]["p50"] for run in runs) / 1000
            print(
                f"{label:<24}"
                + "".join(f"{c:>18}" for c in cells)
                + f"{f'{p50:.2f} ms {statistics.median(ratios):.1f}x':>18}"
            )
        rps = {label: statistics.median(run[label]["rps"] for run in runs) for label in runs[0]}
        print("req/s (median): " + ", ".join(f"{label} {value:.0f}" for label, value in rps.items()))


if __name__ == "__main__":
    main()
