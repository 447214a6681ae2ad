"""The `mms` client's output as az users expect it, run as a user runs it against a live `mms
serve` (no build worker: images stay queued): ``-o json|jsonc|table|tsv|yaml|none`` and
``MMS_OUTPUT``, ``--query``, waiting by default and ``--no-wait``, ``--debug`` and
``--verbose`` with every secret redacted, tables that fit 80 columns, and ``image logs
--follow`` asking only for the bytes of the log it has not printed yet."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from tests.cli.test_first_hour import client, owner, service  # noqa: F401  (the fixtures)
from tests.embedded_service import EmbeddedService
from tests.mms_client.test_client import MMS, Client
from workers.build_log import BuildLogWriter

LONG_NAME = "housing-model-with-a-long-name-x"  # 32 characters, the most a model name has


@pytest.fixture()
def models(client: Client, tmp_path: Path) -> list[dict]:  # noqa: F811
    model = tmp_path / "model.pkl"
    model.write_bytes(b"model bytes")
    return [
        client.json("model", "register", "-m", str(model), "-n", name, "-t", "myTag", "-d", "a description " * 5)
        for name in ("housing.model", LONG_NAME)
    ]


def test_each_output_format_on_a_list_and_a_show(client: Client, models: list[dict]) -> None:  # noqa: F811
    listed = client.json("model", "list")
    assert sorted(m["name"] for m in listed) == sorted(m["name"] for m in models)
    one = models[0]
    for command in (["model", "list"], ["model", "show", "-i", one["id"]]):
        expected = client.json(*command)
        as_json = client.run(*command, "-o", "json")
        assert json.loads(as_json.stdout) == expected and as_json.stdout.startswith(("[\n  {", "{\n  "))
        # jsonc is colored on a terminal only: piped, it is the same JSON.
        assert client.run(*command, "-o", "jsonc").stdout == as_json.stdout
        assert yaml.safe_load(client.run(*command, "-o", "yaml").stdout) == expected
        assert client.run(*command, "-o", "none").stdout == ""
        # MMS_OUTPUT is the default; -o still wins.
        assert json.loads(client.run(*command, env={"MMS_OUTPUT": "json"}).stdout) == expected
        assert "myTag" in client.run(*command, "-o", "table", env={"MMS_OUTPUT": "json"}).stdout
    # tsv as az's: no header, a row per item, a record's values by sorted key, a nested list
    # as its length, a nested record and null empty.
    rows = client.run("model", "list", "-o", "tsv").stdout.splitlines()
    assert len(rows) == len(listed)
    first = listed[0]
    cells = []
    for _, value in sorted(first.items()):
        if isinstance(value, list):
            cells.append(str(len(value)))
        elif isinstance(value, dict) or value is None:
            cells.append("")
        elif isinstance(value, bool):
            cells.append(str(value).lower())
        else:
            cells.append(str(value))
    assert rows[0] == "\t".join(cells)
    shown = client.run("model", "show", "-i", one["id"], "-o", "tsv").stdout
    assert shown.count("\n") == 1 and one["id"] in shown.split("\t")
    table = client.run("model", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["id", "name", "version"] and LONG_NAME in table


def test_query_picks_fields_and_a_bad_query_is_a_usage_error(client: Client, models: list[dict]) -> None:  # noqa: F811
    picked = client.json("model", "list", "--query", "[].{name: name, version: version}")
    assert sorted(picked, key=lambda m: m["name"]) == sorted(
        ({"name": m["name"], "version": m["version"]} for m in models), key=lambda m: m["name"]
    )
    name = client.run("model", "show", "-i", models[0]["id"], "--query", "name", "-o", "tsv")
    assert name.stdout == "housing.model\n"
    ids = client.run("model", "list", "--query", "[].id", "-o", "tsv").stdout.split()
    assert sorted(ids) == sorted(m["id"] for m in models)
    # A table of the query's result: its keys are the columns.
    table = client.run("model", "list", "--query", "[?name=='housing.model'].{Name: name, Tags: tags}", "-o", "table")
    assert table.stdout.split()[:2] == ["Name", "Tags"] and LONG_NAME not in table.stdout
    assert client.run("env", "show", "--query", "account", "-o", "tsv").stdout.strip().startswith("acct-")

    bad = client.run("model", "list", "--query", "[?name=='x'")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "--query" in bad.stderr and "not a JMESPath expression" in bad.stderr
    wrong_type = client.run("model", "list", "--query", "abs(@)")  # valid, but not for a list
    assert wrong_type.returncode == 2 and "--query" in wrong_type.stderr and "abs" in wrong_type.stderr


def test_image_create_waits_unless_told_not_to(client: Client, tmp_path: Path) -> None:  # noqa: F811
    manifest = _manifest(client, tmp_path)
    queued = client.run("image", "create", "-n", "img", "--manifest-id", manifest, "--no-wait", "-o", "json")
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["CreationState"] == "NotStarted"
    # No build worker runs here: waiting (the default) ends at --timeout, exit code 4.
    started = time.monotonic()
    waited = client.run("image", "create", "-n", "img", "--manifest-id", manifest, "--timeout", "2", "-o", "json")
    assert waited.returncode == 4 and "is still NotStarted" in waited.stderr
    assert time.monotonic() - started >= 2
    assert json.loads(waited.stdout)["CreationState"] == "NotStarted"
    # --wait, once needed to wait, is still accepted.
    old = client.run("image", "create", "-n", "img", "--manifest-id", manifest, "--wait", "--timeout", "1")
    assert old.returncode == 4


def test_debug_shows_the_calls_with_every_secret_redacted(
    client: Client,  # noqa: F811
    owner: dict[str, str],  # noqa: F811
) -> None:
    credentials_path = client.config_dir / "credentials.json"
    cached = json.loads(credentials_path.read_text())
    credentials_path.write_text(json.dumps({**cached, "expires_at": time.time() - 10}))  # renewed: a token request

    debug = client.run("model", "list", "--debug")
    assert debug.returncode == 0, debug.stderr
    renewed = json.loads(credentials_path.read_text())["access_token"]
    assert "DEBUG: Request URL: " in debug.stderr and "/oauth2/token" in debug.stderr
    assert "DEBUG: Response headers:" in debug.stderr and "-> 200" in debug.stderr
    assert "'authorization': 'bearer ***'" in debug.stderr.lower()
    assert "client_secret=***" in debug.stderr and '"access_token": "***"' in debug.stderr
    for secret in (owner["clientSecret"], cached["access_token"], renewed):
        assert secret not in debug.stderr + debug.stdout
    # Before the command's name too, as az takes it.
    before = subprocess.run(
        [*MMS, "--verbose", "model", "list", "-o", "none"],
        env=_environment(client),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert before.returncode == 0 and "INFO: GET " in before.stderr and "/models -> 200" in before.stderr
    assert renewed not in before.stderr and "DEBUG" not in before.stderr
    help_text = " ".join(client.run("model", "list", "--help").stdout.split())
    for option in ("--output", "--query", "--verbose", "--debug", "MMS_OUTPUT", "Global Arguments"):
        assert option in help_text


def test_a_table_at_80_columns_keeps_ids_and_names_whole(client: Client, models: list[dict]) -> None:  # noqa: F811
    narrow = client.run("model", "list", env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert all(len(line.rstrip()) <= 80 for line in lines), narrow.stdout
    long_model = next(m for m in models if m["name"] == LONG_NAME)
    row = next(line for line in lines if long_model["id"] in line)
    assert LONG_NAME in row  # whole, on the id's line: never wrapped letter by letter
    assert len(lines) == 2 + len(models)  # headers, their rule, a line per model
    # Wide enough, every column shows; a cut one ends with an ellipsis.
    wide = client.run("model", "list", env={"COLUMNS": "120"}).stdout
    assert wide.splitlines()[0].split() == ["id", "name", "version", "tags", "description", "created"]
    assert "…" in wide and all(len(line.rstrip()) <= 120 for line in wide.splitlines())


@dataclass
class CountingProxy:
    """Forwards to the service and records each build-log request: its Range and its answer."""

    target: str
    logs: list[tuple[str | None, int, int]] = field(default_factory=list)  # range, status, body size
    url: str = ""


@contextmanager
def counting_proxy(target: str) -> Iterator[CountingProxy]:
    proxy = CountingProxy(target)

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            answer = httpx.get(f"{target}{self.path}", headers=headers)
            if self.path.endswith("/log"):
                proxy.logs.append((self.headers.get("Range"), answer.status_code, len(answer.content)))
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    server.daemon_threads = True
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()


def test_logs_follow_asks_only_for_the_new_bytes(
    client: Client,  # noqa: F811
    service: EmbeddedService,  # noqa: F811
    tmp_path: Path,
) -> None:
    manifest = _manifest(client, tmp_path)
    image = client.json("image", "create", "-n", "img", "--manifest-id", manifest, "--no-wait")
    engine = create_engine(f"sqlite:///{service.data_dir / 'mms.db'}")
    writer = BuildLogWriter(sessionmaker(engine), uuid.UUID(image["Id"]), attempt=0)  # as a build worker writes
    with counting_proxy(service.url) as proxy:
        environment = {**_environment(client), "MMS_SERVER": proxy.url}
        follower = subprocess.Popen(
            [*MMS, "image", "logs", "-i", image["Id"], "--follow"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for line in ("step 1/2: FROM the base — ünïcode\n", "step 2/2: done\n"):
                answered = len([log for log in proxy.logs if log[1] == 206])
                writer(line)
                writer.flush()
                _until(lambda answered=answered: len([log for log in proxy.logs if log[1] == 206]) > answered)
            cancelled = client.run("image", "cancel", "-i", image["Id"])
            assert cancelled.returncode == 0, cancelled.stderr
            stdout, stderr = follower.communicate(timeout=30)
        finally:
            follower.kill()
            engine.dispose()
    assert follower.returncode == 0, stderr
    whole = client.run("image", "logs", "-i", image["Id"]).stdout
    assert stdout == whole and "ünïcode" in whole
    # Each request asked for the bytes after those it had: nothing was fetched twice.
    fetched = 0
    for range_header, status, size in proxy.logs:
        assert range_header == f"bytes={fetched}-"
        assert status in (206, 416)
        fetched += size if status == 206 else 0
    assert fetched == len(whole.encode())
    assert len([log for log in proxy.logs if log[1] == 416]) >= 1  # polls with nothing new cost no bytes


def _manifest(mms: Client, tmp_path: Path) -> str:
    score = tmp_path / "score.py"
    score.write_text("def init():\n    pass\n\ndef run(raw_data):\n    return raw_data\n")
    return mms.json("manifest", "create", "-n", "m1", "-f", str(score))["id"]


def _environment(mms: Client) -> dict[str, str]:
    """What `Client.run` gives the command, for a process the test runs itself."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    return {**environment, "MMS_CONFIG_DIR": str(mms.config_dir), "COLUMNS": "200"}


def _until(condition, seconds: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
