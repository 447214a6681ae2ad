"""The client installs alone: `pip install mms` (no extras) into a fresh virtual environment
gives the `mms` command with the client's commands only, and none of the server's dependencies.

It installs for real, from the package index (uv's cache keeps a second run to seconds), since
nothing short of an install proves what an install brings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a wheel of the project is built from (as the Dockerfile's build stage copies it).
SOURCES = ["pyproject.toml", "README.md", "mms_client", "app", "workers", "scoring_server", "migrations"]
CLIENT_COMMANDS = [
    "login",
    "logout",
    "env",
    "account",
    "model",
    "manifest",
    "image",
    "compute",
    "service",
    "base-image",
]
SERVER_COMMANDS = ["serve", "gateway", "worker", "db", "admin", "images"]
SERVER_MODULES = ["celery", "sqlalchemy", "docker", "fastapi", "uvicorn", "alembic", "pydantic_settings", "uv"]


def _run(command: list[str | Path], env: dict[str, str], cwd: Path, timeout: float = 300):
    return subprocess.run(
        [str(part) for part in command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _commands(help_text: str) -> set[str]:
    """The command names of a `--help` page's command panel."""
    panel = help_text.partition("Commands")[2]
    return {line.strip("│ ").split(" ")[0] for line in panel.splitlines() if line.startswith("│ ")}


@pytest.mark.install
def test_the_client_installs_alone_without_the_servers_dependencies(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    # Nothing of this checkout or of the test run's environment may leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MMS_"))}
    env["COLUMNS"] = "200"
    uv = [sys.executable, "-m", "uv"]
    venv = tmp_path / "venv"
    made = _run([*uv, "venv", "--quiet", "--python", sys.executable, venv], env, tmp_path)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run([*uv, "pip", "install", "--quiet", "--python", python, source], env, tmp_path)
    assert installed.returncode == 0, installed.stderr

    shown = _run([venv / "bin" / "mms", "--help"], env, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert _commands(shown.stdout) == set(CLIENT_COMMANDS), shown.stdout
    base_images = _run([venv / "bin" / "mms", "base-image", "--help"], env, tmp_path)
    assert _commands(base_images.stdout) == {"list"}, base_images.stdout
    for command in SERVER_COMMANDS:
        missing = _run([venv / "bin" / "mms", command, "--help"], env, tmp_path)
        assert missing.returncode == 2 and "No such command" in missing.stderr, (command, missing.stderr)

    probe = (
        "import importlib.util, json, mms_client, mms_client.api, mms_client.cli; "
        "from mms_client import Image, InferenceConfig, Model, ServiceError, Workspace; "
        f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {SERVER_MODULES!r}}}))"
    )
    imported = _run([python, "-c", probe], env, tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == dict.fromkeys(SERVER_MODULES, False)
    # The package it imported is the installed one, not this checkout.
    where = _run([python, "-c", "import mms_client; print(mms_client.__file__)"], env, tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
