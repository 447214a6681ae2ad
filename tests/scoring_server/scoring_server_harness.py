"""Helpers that run scoring_server as a real subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The package may not be installed; the subprocesses and the unit tests import it from here.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STARTUP_TIMEOUT = 20.0
REQUEST_TIMEOUT = 10.0


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    def request(self, method: str, path: str, body=None, headers=None) -> Response:
        """One request on a fresh connection, bounded by REQUEST_TIMEOUT."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            lowered = {k.lower(): v for k, v in resp.getheaders()}
            return Response(resp.status, lowered, resp.read())
        finally:
            conn.close()

    def score(self, payload, headers=None) -> Response:
        """POST /score with ``payload`` encoded as JSON."""
        return self.request("POST", "/score", json.dumps(payload), headers)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a server process: repo importable, model dir in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZUREML_", "SCORING_"))}
    env.update(PYTHONPATH=str(REPO), HOST="127.0.0.1", AZUREML_MODEL_DIR=str(tmp_path / "model"))
    env.update(extra)
    return env


def write_script(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "score.py"
    path.write_text(textwrap.dedent(source))
    return path


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM, SIGKILL after 10 s; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def launch(
    workdir: Path, source: str, env: dict[str, str] | None = None, files=None, python: str = sys.executable
) -> Server:
    """Write score.py (and model files) into ``workdir``, start a server under ``python``,
    wait until healthy."""
    (workdir / "model").mkdir(exist_ok=True)
    for name, content in (files or {}).items():
        (workdir / "model" / name).write_text(content)
    write_script(workdir, source)
    port = free_port()
    log = workdir / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [python, "-m", "scoring_server"],
            cwd=workdir,
            env=server_env(workdir, PORT=str(port), **(env or {})),
            stdout=out,
            stderr=out,
        )
    server = Server(proc, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.stderr()}")
        try:
            if server.request("GET", "/").status == 200:
                return server
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise AssertionError(f"server not healthy within {STARTUP_TIMEOUT} s:\n{server.stderr()}")
