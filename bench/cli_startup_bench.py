"""How long the `mms` command takes to start: help and offline commands, with the server installed.

The server's commands join `mms` through entry points, so their modules load on every start;
what they need (settings, the database, FastAPI) must load only when one of them runs.
Prints the median wall time of several runs of each command (issue 20: under 0.3 s).

    .venv/bin/python bench/cli_startup_bench.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (
    ["--help"],
    ["model", "list", "--help"],
    ["image", "create", "--help"],
    ["serve", "--help"],
    ["env", "show"],
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    mms = Path(sys.executable).with_name("mms")
    with tempfile.TemporaryDirectory() as home:  # no saved login: nothing read but the code
        env = {**os.environ, "HOME": home, "MMS_CONFIG_DIR": home}
        print(f"{'command':<28}{'median s':>10}{'min s':>8}{'max s':>8}  ({args.runs} runs, {os.cpu_count()} cores)")
        for command in COMMANDS:
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                subprocess.run([str(mms), *command], env=env, capture_output=True, check=False, timeout=60)
                times.append(time.perf_counter() - started)
            label = "mms " + " ".join(command)
            print(f"{label:<28}{statistics.median(times):>10.2f}{min(times):>8.2f}{max(times):>8.2f}")


if __name__ == "__main__":
    main()
