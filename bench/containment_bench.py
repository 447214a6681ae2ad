"""What containing a build step costs: bubblewrap against a plain process and against a
container of the Docker engine, for an empty step and for a real one (building a wheel).

    empty      ``python -c pass``: a plain subprocess, contained (workers.sandbox), and in
               ``docker run --rm --network none <base image>``
    wheel      ``pip wheel --no-deps --no-build-isolation --no-index`` of a small setuptools
               sdist (made here), the same three ways

The container runs the worker's own Python (its folders mounted read-only, as the sandbox
does), so only the containment differs.

Each is run ``--repeat`` times (default 7); the median and the spread are printed, and with
``--json PATH`` written. Run as root (the engine and the base image come from scripts/infra):

    .venv/bin/python bench/containment_bench.py [--repeat 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workers.sandbox import Limits, run_contained

SDIST_FILES = {
    "pyproject.toml": '[build-system]\nrequires = ["setuptools>=70.1"]\n'
    'build-backend = "setuptools.build_meta"\n'
    '[project]\nname = "benchpkg"\nversion = "1.0"\n',
    "benchpkg/__init__.py": "VALUE = 1\n",
}


def _sdist(folder: Path) -> Path:
    path = folder / "benchpkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in SDIST_FILES.items():
            data = text.encode()
            info = tarfile.TarInfo(f"benchpkg-1.0/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.chmod(0o644)
    return path


def _time(fn: Callable[[], None], repeat: int) -> dict[str, float]:
    fn()  # warm the page cache and the engine
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = dict(
        line.split("=", 1)
        for line in subprocess.run(
            [str(ROOT / "scripts/infra/docker-engine.sh")], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if "=" in line
    )
    base = dict(
        line.split("=", 1)
        for line in subprocess.run(
            [str(ROOT / "scripts/infra/base-image.sh")], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        if "=" in line
    )["MMS_BASE_IMAGE"]
    docker = ["docker", "--host", env["DOCKER_HOST"]]
    limits = Limits(wall_seconds=300)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mms-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        sdist = _sdist(work)
        wheel_args = [
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "-q",
        ]

        def fresh(name: str) -> Path:
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            out.chmod(0o777)
            return out

        results["empty: plain process"] = _time(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), args.repeat
        )
        results["empty: contained (bubblewrap)"] = _time(
            lambda: run_contained(
                [sys.executable, "-c", "pass"],
                inputs={},
                output=fresh("o"),
                limits=limits,
                log=lambda _: None,
                what="bench",
            ),
            args.repeat,
        )
        # The same Python, pip and setuptools in a container: only the containment differs.
        same_python = [f"--volume={p}:{p}:ro" for p in dict.fromkeys((sys.prefix, sys.base_prefix))]
        container = [
            *docker,
            "run",
            "--rm",
            "--network",
            "none",
            *same_python,
            f"--volume={work}:/in:ro",
            base,
            sys.executable,
        ]
        results["empty: engine container"] = _time(
            lambda: subprocess.run([*container, "-c", "pass"], check=True, capture_output=True), args.repeat
        )
        results["wheel: plain process"] = _time(
            lambda: subprocess.run(
                [sys.executable, *wheel_args, "-w", str(fresh("w")), str(sdist)], check=True, capture_output=True
            ),
            args.repeat,
        )
        results["wheel: contained (bubblewrap)"] = _time(
            lambda: run_contained(
                [sys.executable, *wheel_args, "-w", "/out", f"/in/{sdist.name}"],
                inputs={sdist: f"/in/{sdist.name}"},
                output=fresh("c"),
                limits=limits,
                log=lambda _: None,
                what="bench",
            ),
            args.repeat,
        )
        results["wheel: engine container"] = _time(
            lambda: subprocess.run(
                [*container, *wheel_args, "-w", "/tmp/w", f"/in/{sdist.name}"], check=True, capture_output=True
            ),
            args.repeat,
        )
    width = max(map(len, results))
    for name, figures in results.items():
        print(
            f"{name:<{width}}  median {figures['median_s'] * 1000:8.1f} ms  "
            f"(min {figures['min_s'] * 1000:.1f}, max {figures['max_s'] * 1000:.1f}, n={args.repeat})"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
