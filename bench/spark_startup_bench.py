"""Time a SparkPython scoring image from container start to its first successful ``/score``.

Each run creates a container on the host network (a free port, ``PORT``), starts it, and
POSTs the payload every 100 ms until ``/score`` answers 200; it reports that time, the time
until ``GET /`` first answered, and the ``Spark ... started in`` figure the server logs.
Images are run as built (pulled first when missing); ``--env KEY=VALUE`` sets the container's
environment, to compare settings (say ``SPARK_DRIVER_JAVA_OPTIONS=``).

    .venv/bin/python bench/spark_startup_bench.py IMAGE [IMAGE ...] [--runs 3] \\
        [--payload '{"data": [[5.0, 10.0, 1.0]]}'] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import time
import urllib.error
import urllib.request

import docker

STARTED = re.compile(r"Spark (\S+) started in ([0-9.]+) s")
DEFAULT_PAYLOAD = '{"data": [[5.0, 10.0, 1.0], [6.0, 17.0, 2.0]]}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: bytes) -> int:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return answer.status


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status


def one_run(
    api: docker.APIClient, image: str, payload: bytes, env: dict[str, str], timeout: float
) -> dict[str, float | None]:
    """Start ``image`` once; seconds to health, to the first 200 from /score, Spark's own."""
    port = free_port()
    container = api.create_container(
        image,
        environment={**env, "PORT": str(port)},
        host_config=api.create_host_config(network_mode="host"),
        labels={"org.mms.bench": "spark-startup"},
    )
    started = time.monotonic()
    api.start(container)
    healthy = None
    try:
        while time.monotonic() - started < timeout:
            try:
                if healthy is None and _get(f"http://127.0.0.1:{port}/") == 200:
                    healthy = time.monotonic() - started
                if healthy is not None and _post(f"http://127.0.0.1:{port}/score", payload) == 200:
                    scored = time.monotonic() - started
                    found = STARTED.search(api.logs(container).decode(errors="replace"))
                    return {"score": scored, "health": healthy, "spark": float(found[2]) if found else None}
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if not api.inspect_container(container)["State"]["Running"]:
                    raise SystemExit(f"{image} exited:\n{api.logs(container).decode()[-3000:]}")
            time.sleep(0.1)
        raise SystemExit(f"{image}: no successful /score within {timeout} s")
    finally:
        api.remove_container(container, force=True)


def main() -> int:
    """Run the benchmark and print one line per image."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--payload", default=DEFAULT_PAYLOAD)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the container")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    payload = json.dumps(json.loads(args.payload)).encode()
    api = docker.APIClient(version="auto", timeout=300)
    print(f"{'image':60} {'runs':>4} {'to /score (median, min-max)':>28} {'to GET /':>9} {'Spark':>6}")
    for image in args.images:
        try:
            api.inspect_image(image)
        except docker.errors.ImageNotFound:
            for _ in api.pull(image, stream=True, decode=True):
                pass
        one_run(api, image, payload, env, args.timeout)  # warm the engine's file cache once
        runs = [one_run(api, image, payload, env, args.timeout) for _ in range(args.runs)]
        scores = [r["score"] for r in runs]
        spark = [r["spark"] for r in runs if r["spark"] is not None]
        print(
            f"{image[-60:]:60} {len(runs):>4} {statistics.median(scores):>10.1f} s "
            f"({min(scores):.1f}-{max(scores):.1f} s)      "
            f"{statistics.median(r['health'] for r in runs):>7.1f} s "
            f"{statistics.median(spark) if spark else float('nan'):>4.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
