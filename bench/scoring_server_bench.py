"""Benchmark scoring_server against Azure's azureml-inference-server-http on the same score.py.

Each server runs as one process pinned to CPU 0 and listens on 127.0.0.1 only; wrk (Debian
package ``wrk``) pinned to CPU 1 drives POST /score for a fixed time per concurrency level.
azmlinfsrv is installed into its own venv (``AZML_VENV``, default /tmp/azml-venv), created on
first use. Run: ``.venv/bin/python bench/scoring_server_bench.py [--duration 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AZML_VENV = Path(os.environ.get("AZML_VENV", "/tmp/azml-venv"))
AZML_REQUIREMENT = "azureml-inference-server-http>=1.5,<1.6"

SCORE_PY = """\
import json, math, os

def init():
    global WEIGHTS, BIAS
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.json")) as f:
        model = json.load(f)
    WEIGHTS, BIAS = model["weights"], model["bias"]

def run(raw_data):
    rows = json.loads(raw_data)["data"]
    logits = [sum(w * x for w, x in zip(WEIGHTS, row)) + BIAS for row in rows]
    return {"scores": [round(1 / (1 + math.exp(-z)), 6) for z in logits]}
"""
MODEL = {"weights": [0.5, -0.25, 0.125, 1.0, -1.0, 0.75, 0.2, -0.3], "bias": 0.1}
PAYLOAD = {"data": [[float(i + j) / 10 for j in range(8)] for i in range(4)]}

# Azure's launcher hard-codes 0.0.0.0; patch the constant so nothing listens beyond loopback.
AZML_LAUNCH = (
    "import sys; from azureml_inference_server_http import amlserver; "
    "amlserver.DEFAULT_HOST = '127.0.0.1'; sys.argv[0] = 'azmlinfsrv'; sys.exit(amlserver.run())"
)


def ensure_azml_venv() -> Path:
    """Create the separate venv holding azureml-inference-server-http if it is missing."""
    python = AZML_VENV / "bin" / "python"
    if not (AZML_VENV / "bin" / "azmlinfsrv").exists():
        print(f"creating {AZML_VENV} with {AZML_REQUIREMENT} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(AZML_VENV)], check=True, timeout=300)
        pip = [str(python), "-m", "pip", "install", "-q", AZML_REQUIREMENT]
        subprocess.run(pip, check=True, timeout=900)
    return python


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    """Prefix ``cmd`` with taskset so server and load generator do not share a core."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def servers(workdir: Path, azml_python: Path | None) -> dict[str, tuple[list[str], dict]]:
    """Name -> (command, extra env); the port is filled in at start."""
    ours = [sys.executable, "-m", "scoring_server"]
    found = {
        "scoring_server (httptools+uvloop)": (
            ours,
            {"SCORING_HTTP": "auto", "SCORING_LOOP": "auto"},
        ),
        "scoring_server (pure Python h11+asyncio)": (
            ours,
            {"SCORING_HTTP": "h11", "SCORING_LOOP": "asyncio"},
        ),
    }
    if azml_python:
        cmd = [str(azml_python), "-c", AZML_LAUNCH, "--entry_script", str(workdir / "score.py")]
        found["azmlinfsrv 1.5 (gunicorn+flask)"] = (cmd + ["--port", "{port}"], {})
    return found


def start(cmd: list[str], env_extra: dict, workdir: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """Start a server on a free port and wait (bounded) until GET / answers 200."""
    port = free_port()
    env = dict(
        os.environ,
        PORT=str(port),
        HOST="127.0.0.1",
        PYTHONPATH=str(REPO),
        AZUREML_MODEL_DIR=str(workdir / "model"),
        **env_extra,
    )
    cmd = [part.replace("{port}", str(port)) for part in cmd]
    with open(log, "wb") as out:
        proc = subprocess.Popen(pinned(0, cmd), cwd=workdir, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                if resp.status == 200:
                    return proc, port
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"server not healthy within 60 s:\n{_tail(log)}")


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def score_once(port: int) -> dict:
    """One POST /score, to check both servers compute the same answer."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/score",
        json.dumps(PAYLOAD).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wrk(port: int, lua: Path, connections: int, seconds: int) -> dict:
    """Run wrk for ``seconds`` and parse requests/s, p50, p99 and errors."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(lua),
        f"http://127.0.0.1:{port}/score",
    ]
    out = subprocess.run(pinned(1, cmd), capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        "p99_ms": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": sock.group(1).strip() if sock else "",
    }


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def main() -> int:
    """Benchmark every server at each concurrency level and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", default="1,16", help="comma-separated wrk -c values")
    parser.add_argument("--skip-azml", action="store_true", help="only benchmark scoring_server")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk")
    azml_python = None if args.skip_azml else ensure_azml_venv()
    levels = [int(c) for c in args.connections.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="scoring-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "model").mkdir()
        (workdir / "model" / "model.json").write_text(json.dumps(MODEL))
        (workdir / "score.py").write_text(SCORE_PY)
        lua = workdir / "post.lua"
        lua.write_text(
            'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(json.dumps(PAYLOAD))}\n"
        )
        expected = None
        for i, (name, (cmd, env_extra)) in enumerate(servers(workdir, azml_python).items()):
            log = workdir / f"server{i}.log"
            proc, port = start(cmd, env_extra, workdir, log)
            try:
                answer = score_once(port)
                if expected is not None and answer != expected:
                    raise RuntimeError(f"{name} answered {answer}, expected {expected}")
                expected = answer
                wrk(port, lua, max(levels), 2)  # warm-up
                for connections in levels:
                    row = {
                        "server": name,
                        "connections": connections,
                        **wrk(port, lua, connections, args.duration),
                    }
                    results.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                stop(proc)
    print("\n| server | conns | req/s | p50 ms | p99 ms | non-2xx |\n|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['server']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['non_2xx']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
