"""What checking a pooled PostgreSQL connection costs: SQLAlchemy's pool_pre_ping (a SELECT 1
round trip at every checkout) against the service's check (app/database.py: a ping only when
the socket has something to read), each measured as checkout + the request's own SELECT 1.

    .venv/bin/python bench/pool_checkout_bench.py [--rounds 5] [--checkouts 3000] [--url URL]
"""

from __future__ import annotations

import argparse
import statistics
import time

from sqlalchemy import create_engine, event, text

from app.database import _check_idle_connection


def one_round(url: str, checkouts: int, *, pre_ping: bool) -> float:
    engine = create_engine(url, pool_size=2, pool_pre_ping=pre_ping, isolation_level="AUTOCOMMIT")
    if not pre_ping:
        event.listen(engine, "checkout", _check_idle_connection)
    try:
        with engine.connect() as connection:  # the pool's connection, made once
            connection.execute(text("SELECT 1"))
        started = time.perf_counter()
        for _ in range(checkouts):
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        return (time.perf_counter() - started) / checkouts * 1e6
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkouts", type=int, default=3000)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"pool_pre_ping": [], "socket check": []}
    for _ in range(args.rounds):  # interleaved: drift on a shared machine hits both alike
        results["pool_pre_ping"].append(one_round(args.url, args.checkouts, pre_ping=True))
        results["socket check"].append(one_round(args.url, args.checkouts, pre_ping=False))
    print(f"checkout + SELECT 1, µs each ({args.rounds} rounds of {args.checkouts}):")
    for name, values in results.items():
        print(f"  {name:<14} median {statistics.median(values):7.1f}   runs {' '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
