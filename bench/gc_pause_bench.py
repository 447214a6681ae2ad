"""What a full garbage collection costs an API process, before and after app_factory freezes
what the process made at start (modules, routes, schemas).

A full collection stops the process: every request in flight waits it out. Builds the app in
this process as `mms serve` does (no server, no database traffic), then times gc.collect().

    .venv/bin/python bench/gc_pause_bench.py [--runs 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time


def _collections(runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("MMS_DATA_DIR", tempfile.mkdtemp(prefix="mms-gc-bench-"))
    from app import main as app_main

    app_main.create_app(app_main.get_settings())
    print(f"objects tracked: {len(gc.get_objects())}")
    print(f"full collection, nothing frozen: {_collections(args.runs):.1f} ms (median of {args.runs})")
    gc.unfreeze()
    app_main.app_factory()  # as each API process starts: builds the app, then freezes
    print(f"objects frozen: {gc.get_freeze_count()}")
    print(f"full collection, after app_factory: {_collections(args.runs):.3f} ms (median of {args.runs})")


if __name__ == "__main__":
    main()
