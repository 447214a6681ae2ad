"""scoring_server end to end: real server processes, real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from .scoring_server_harness import (
    REQUEST_TIMEOUT,
    free_port,
    launch,
    server_env,
    stop,
    write_script,
)

SCORE_PY = """
import json, os, time

def init():
    global MODEL
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.json")) as f:
        MODEL = json.load(f)

class FakeArray:  # numpy-like duck types, so the test needs no numpy
    def __init__(self, values):
        self.values = values
    def tolist(self):
        return list(self.values)

class FakeScalar:
    def __init__(self, value):
        self.value = value
    def item(self):
        return self.value

def run(raw_data):
    assert isinstance(raw_data, str), type(raw_data)
    request = json.loads(raw_data)
    kind = request.get("kind")
    if kind == "fail":
        raise ValueError("bad input: " + request["why"])
    if kind == "sleep":
        time.sleep(request["seconds"])
        return "slept"
    if kind == "str":
        return "plain text"
    if kind == "none":
        return None
    if kind == "bytes":
        return b"\\x00raw"
    if kind == "numpy":
        return {"array": FakeArray([1, 2]), "scalar": FakeScalar(3.5)}
    if kind == "unserialisable":
        return object()
    return {"scores": [MODEL["weight"] * x for x in request["data"]]}
"""
MODEL = json.dumps({"weight": 2.5})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the read-only tests of this module, with a 4 KiB body limit."""
    server = launch(
        tmp_path_factory.mktemp("app"),
        SCORE_PY,
        env={"SCORING_MAX_BODY_BYTES": "4096"},
        files={"model.json": MODEL},
    )
    yield server
    stop(server.proc)


def is_uuid4(text: str) -> bool:
    try:
        return uuid.UUID(text).version == 4
    except ValueError:
        return False


def test_health(server):
    resp = server.request("GET", "/")
    assert resp.status == 200
    assert resp.json() == {"status": "Healthy"}
    assert is_uuid4(resp.headers["x-ms-request-id"])


def test_health_head_has_no_body(server):
    resp = server.request("HEAD", "/")
    assert (resp.status, resp.body) == (200, b"")


def test_score_round_trip_uses_model_dir(server):
    resp = server.score({"data": [1, 2, 4]})
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"scores": [2.5, 5.0, 10.0]}
    assert is_uuid4(resp.headers["x-ms-request-id"])


@pytest.mark.parametrize(
    ("kind", "content_type", "body"),
    [
        ("str", "application/json", b'"plain text"'),  # Azure sends a str as a JSON string
        ("none", "application/json", b"{}"),
        ("bytes", "application/octet-stream", b"\x00raw"),
        ("numpy", "application/json", b'{"array": [1, 2], "scalar": 3.5}'),
    ],
)
def test_output_encoding(server, kind, content_type, body):
    resp = server.score({"kind": kind})
    assert (resp.status, resp.headers["content-type"], resp.body) == (200, content_type, body)


def test_run_exception_is_500_json_with_traceback_only_in_log(server):
    resp = server.score({"kind": "fail", "why": "marker-7f3a"}, {"x-ms-request-id": "req-fail-1"})
    assert resp.status == 500
    assert resp.headers["x-ms-request-id"] == "req-fail-1"
    assert resp.json() == {
        "error": "run() raised: ValueError: bad input: marker-7f3a",
        "requestId": "req-fail-1",
    }
    assert b"Traceback" not in resp.body
    deadline = time.monotonic() + 5  # the log line may trail the response slightly
    while "marker-7f3a" not in server.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.stderr()
    assert "req-fail-1" in log and "Traceback (most recent call last)" in log
    assert 'raise ValueError("bad input: " + request["why"])' in log


def test_unserialisable_output_is_500(server):
    resp = server.score({"kind": "unserialisable"})
    assert resp.status == 500
    assert "cannot be sent as JSON" in resp.json()["error"]
    assert resp.json()["requestId"] == resp.headers["x-ms-request-id"]


@pytest.mark.parametrize("header", ["x-ms-request-id", "x-request-id", "X-Request-ID"])
def test_request_id_is_propagated(server, header):
    resp = server.score({"data": [1]}, {header: "client-id-42"})
    assert resp.headers["x-ms-request-id"] == "client-id-42"


def test_ms_request_id_wins_over_request_id(server):
    resp = server.request("GET", "/", headers={"x-request-id": "b", "x-ms-request-id": "a"})
    assert resp.headers["x-ms-request-id"] == "a"


def test_overlong_request_id_is_replaced(server):
    resp = server.request("GET", "/", headers={"x-ms-request-id": "x" * 101})
    assert is_uuid4(resp.headers["x-ms-request-id"])


def test_get_score_is_405(server):
    resp = server.request("GET", "/score")
    assert resp.status == 405
    assert resp.headers["allow"] == "POST"
    assert resp.json()["requestId"] == resp.headers["x-ms-request-id"]


def test_unknown_route_is_404(server):
    resp = server.request("GET", "/nope")
    assert resp.status == 404 and "requestId" in resp.json()


def test_swagger_describes_score(server):
    resp = server.request("GET", "/swagger.json")
    assert resp.status == 200
    doc = resp.json()
    assert doc["swagger"] == "2.0" and "post" in doc["paths"]["/score"]


def test_invalid_utf8_is_400(server):
    resp = server.request("POST", "/score", body=b'{"data": "\xff"}')
    assert resp.status == 400 and "UTF-8" in resp.json()["error"]


def test_body_over_limit_is_413(server):
    resp = server.request("POST", "/score", body=b" " * 5000)
    assert resp.status == 413
    assert "4096" in resp.json()["error"]
    assert server.score({"data": [1]}).status == 200  # still serving


def test_chunked_body_over_limit_is_413(server):
    chunks = iter([b" " * 3000, b" " * 3000])  # no Content-Length: http.client sends chunked
    resp = server.request("POST", "/score", body=chunks)
    assert resp.status == 413


def test_body_at_limit_is_accepted(server):
    body = json.dumps({"data": [1]}).encode()
    resp = server.request("POST", "/score", body=body + b" " * (4096 - len(body)))
    assert resp.status == 200


def test_keep_alive_connection_serves_many_requests(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
    try:
        for i in range(20):
            conn.request("POST", "/score", body=json.dumps({"data": [i]}))
            resp = conn.getresponse()
            assert json.loads(resp.read()) == {"scores": [2.5 * i]}
    finally:
        conn.close()


def test_health_answers_while_run_is_busy(server):
    slow = threading.Thread(target=server.score, args=({"kind": "sleep", "seconds": 2},))
    slow.start()
    try:
        time.sleep(0.3)  # let the slow request reach run()
        started = time.monotonic()
        assert server.request("GET", "/").status == 200
        assert time.monotonic() - started < 1.0
    finally:
        slow.join(timeout=REQUEST_TIMEOUT)


def test_port_env_is_honoured_and_sigterm_shuts_down_gracefully(tmp_path):
    server = launch(tmp_path, SCORE_PY, files={"model.json": MODEL})
    try:
        assert f"127.0.0.1:{server.port}" in server.stderr()
        assert server.score({"data": [2]}).json() == {"scores": [5.0]}
    finally:
        # uvicorn re-raises SIGTERM after its graceful shutdown, hence -15 rather than 0.
        assert stop(server.proc) in (0, -signal.SIGTERM)
    assert "Finished server process" in server.stderr()


def test_model_dir_defaults_when_unset(start_server):
    source = """
        import os
        def init():
            pass
        def run(raw_data):
            return os.environ["AZUREML_MODEL_DIR"]
    """
    server = start_server(source, env={"AZUREML_MODEL_DIR": ""})
    assert server.score({}).json() == "/var/azureml-app/azureml-models"


def test_request_headers_and_driver_module(start_server):
    source = """
        import types
        driver_module = types.ModuleType("real_score")
        exec("def run(data, request_headers):\\n    return request_headers.get('x-tenant')",
             driver_module.__dict__)
        def init():
            pass
        def run(data):
            raise AssertionError("the driver module's run() should be called")
    """
    server = start_server(source)
    assert server.score({}, {"x-tenant": "contoso"}).json() == "contoso"


def test_works_without_compiled_speedups(start_server, tmp_path):
    # Shadow httptools and uvloop so that uvicorn's "auto" choice falls back to h11/asyncio.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("httptools", "uvloop"):
        (shadow / f"{name}.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": f"{shadow}:{server_env(tmp_path)['PYTHONPATH']}"}
    server = start_server(SCORE_PY, env=env, files={"model.json": MODEL})
    assert server.score({"data": [4]}).json() == {"scores": [10.0]}


def run_to_exit(tmp_path, source: str | None, **env: str) -> subprocess.CompletedProcess:
    """Start the server where it must fail at start-up; bounded by a timeout."""
    if source is not None:
        write_script(tmp_path, source)
    env = server_env(tmp_path, PORT=str(free_port()), **env)
    return subprocess.run(
        [sys.executable, "-m", "scoring_server"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_init_failure_exits_nonzero_with_traceback(tmp_path):
    source = """
        def init():
            raise RuntimeError("model file missing: marker-91c2")
        def run(raw_data):
            return raw_data
    """
    result = run_to_exit(tmp_path, source)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: model file missing: marker-91c2" in result.stderr
    assert "Uvicorn running" not in result.stderr  # never started serving


def test_import_failure_exits_nonzero(tmp_path):
    result = run_to_exit(tmp_path, "import not_a_real_module_xyz\n")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr


def test_missing_script_exits_nonzero(tmp_path):
    result = run_to_exit(tmp_path, None, AZUREML_ENTRY_SCRIPT="nowhere.py")
    assert result.returncode != 0
    assert "entry script not found" in result.stderr


def test_script_without_run_exits_nonzero(tmp_path):
    result = run_to_exit(tmp_path, "def init():\n    pass\n")
    assert result.returncode != 0
    assert "does not define run()" in result.stderr


def test_default_settings():
    from scoring_server.config import Settings

    settings = Settings.from_env({})
    assert (settings.host, settings.port) == ("0.0.0.0", 5001)
    assert settings.model_dir == "/var/azureml-app/azureml-models"
    assert settings.max_body_bytes == 100 * 1024 * 1024
    assert settings.entry_script.name == "score.py"


def test_entry_script_resolves_against_app_root(tmp_path):
    from scoring_server.config import Settings

    (tmp_path / "driver.py").write_text("")
    env = {"AML_APP_ROOT": str(tmp_path), "AZUREML_ENTRY_SCRIPT": "driver.py", "PORT": "8080"}
    settings = Settings.from_env(env)
    assert settings.entry_script == (tmp_path / "driver.py").resolve()
    assert settings.port == 8080
