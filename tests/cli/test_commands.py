"""The `mms` server-side commands, run as a user runs them: as processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from app.database import DatabaseNotMigrated, ensure_migrated


def _mms(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    environment.update({"MMS_DATA_DIR": str(data_dir), **env})
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], env=environment, capture_output=True, text=True, timeout=60
    )


def test_bootstrap_prints_credentials_once(tmp_path: Path) -> None:
    first = _mms(["admin", "bootstrap", "-o", "json"], tmp_path)
    assert first.returncode == 0, first.stderr
    credentials = json.loads(first.stdout)
    assert set(credentials) == {"clientId", "clientSecret", "tokenUrl"}
    assert credentials["tokenUrl"].endswith("/oauth2/token")

    again = _mms(["admin", "bootstrap", "-o", "json"], tmp_path)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "/api/servicePrincipals" in again.stderr
    assert credentials["clientSecret"] not in again.stdout + again.stderr


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_serve_refuses_an_unmigrated_database(tmp_path: Path, command: str) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = _mms([command], tmp_path, MMS_DATABASE_URL=url)
    assert result.returncode == 1
    assert "mms db upgrade" in result.stderr

    upgraded = _mms(["db", "upgrade"], tmp_path, MMS_DATABASE_URL=url)
    assert upgraded.returncode == 0, upgraded.stderr
    ensure_migrated(create_engine(url))


def test_ensure_migrated_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(DatabaseNotMigrated, match="mms db upgrade"):
        ensure_migrated(create_engine(f"sqlite:///{tmp_path / 'blank.db'}"))


def test_production_refuses_a_placeholder_secret(tmp_path: Path) -> None:
    result = _mms(["db", "upgrade"], tmp_path, MMS_ENV="production", MMS_SECRET_KEY="changeme")
    assert result.returncode == 1
    assert "MMS_SECRET_KEY" in result.stderr


def test_the_docker_builder_is_a_default_with_or_without_a_registry(tmp_path: Path) -> None:
    # Without one it stores its images in the service's own store (an engine is asked per build).
    assert _mms(["db", "upgrade"], tmp_path, MMS_BUILDER="docker").returncode == 0
    assert _mms(["db", "upgrade"], tmp_path, MMS_BUILDER="docker", MMS_REGISTRY="127.0.0.1:5000").returncode == 0
