"""A copy of the database beside the original, on one engine: the copy carries the original's
installation id, so its orphan sweep would remove the original's services made after the copy
(and its passes would take the original's replicas for its own). A copy deploys and sweeps
nothing until the operator says what it is (`mms admin installation --new-id` / `--adopt`)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.config import Settings
from app.context import ServiceContext
from app.database import migrate, session_scope
from app.deployments import installation
from tests.infra import TEST_LABEL, Infra
from workers.deploy import reconcile
from workers.deploy.local import INSTALLATION_LABEL, SERVICE_LABEL
from workers.deploy.local_network import ensure_service_network, network_name, remove_service_network

ROOT = Path(__file__).resolve().parents[3]


def _copy(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Settings]]:
    """(an original, migrated; a copy of it made as an operator would: a TEMPLATE database on
    the same PostgreSQL cluster, a copied file for SQLite)."""
    url = make_url(settings.resolved_database_url)
    if url.drivername.startswith("sqlite"):
        original = tmp_path / "original.db"
        first = settings.model_copy(update={"database_url": f"sqlite:///{original}"})
        context = ServiceContext.build(first)
        migrate(context.engine)
        context.dispose()
        shutil.copyfile(original, tmp_path / "copy.db")
        yield first, settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'copy.db'}"})
        return
    names = [f"mms_installation_{uuid.uuid4().hex[:10]}", f"mms_installation_{uuid.uuid4().hex[:10]}"]
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {names[0]}")
    first, second = (
        settings.model_copy(update={"database_url": url.set(database=name).render_as_string(False)}) for name in names
    )
    try:
        context = ServiceContext.build(first)
        migrate(context.engine)
        context.dispose()  # CREATE DATABASE ... TEMPLATE needs the original without connections
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {names[1]} TEMPLATE {names[0]}")
        yield first, second
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            for name in names:
                connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture()
def databases(settings: Settings, infra: Infra, tmp_path: Path) -> Iterator[tuple[ServiceContext, ServiceContext]]:
    """Contexts on an original database and on a copy of it, both deploying to the tests' engine."""
    for first, second in _copy(settings, tmp_path):
        engine = {"docker_host": infra.docker_host}
        contexts = [ServiceContext.build(s.model_copy(update=engine)) for s in (first, second)]
        try:
            yield contexts[0], contexts[1]
        finally:
            for context in contexts:
                context.dispose()


def _state(context: ServiceContext) -> installation.InstallationState:
    with session_scope(context.read_session_factory) as session:
        return installation.read(session)


def test_a_copy_of_the_database_sweeps_nothing_until_told_what_it_is(
    databases: tuple[ServiceContext, ServiceContext],
    infra: Infra,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original, copy = databases
    monkeypatch.setattr(reconcile, "_copied_said_at", float("-inf"))
    label = reconcile.installation_id(original)
    assert _state(copy).label == label and _state(copy).copied
    # A service the original made after the copy: the copy does not know it.
    newer = uuid.uuid4()
    with infra.api() as api:
        labels = {INSTALLATION_LABEL: label, TEST_LABEL: "installation-copy"}
        ensure_service_network(api, newer, original.settings.service_subnet_pool, labels=labels)
        replica = api.create_container(
            infra.base_image,
            command=["sleep", "60"],
            labels={SERVICE_LABEL: str(newer), **labels},
            host_config=api.create_host_config(network_mode=network_name(newer)),
        )["Id"]
        try:
            with caplog.at_level(logging.ERROR, logger="mms.deploy"):
                assert reconcile.sweep_orphans(copy) == []
            assert api.containers(all=True, filters={"id": replica}), "the copy swept the original's replica"
            said = [r for r in caplog.records if r.getMessage() == "deploy.installation_copied"]
            assert said and "mms admin installation --new-id" in said[0].detail  # type: ignore[attr-defined]
            with pytest.raises(installation.InstallationCopied, match="--adopt"):
                reconcile.installation_id(copy)

            # The operator says it is a copy: an id of its own, and the original's objects are not its.
            with session_scope(copy.session_factory) as session:
                fresh = installation.new_id(session)
            assert fresh.label != label and not _state(copy).copied
            assert reconcile.installation_id(copy) == fresh.label
            assert reconcile.sweep_orphans(copy) == []
            assert api.containers(all=True, filters={"id": replica})

            # The original, which knows no such service either, sweeps it: the check was what held the copy.
            assert reconcile.sweep_orphans(original) == [newer]
            assert not api.containers(all=True, filters={"id": replica})
        finally:
            for container in api.containers(all=True, filters={"label": f"{TEST_LABEL}=installation-copy"}):
                api.remove_container(container["Id"], force=True)
            remove_service_network(api, newer)


def test_a_restored_database_keeps_its_id_once_adopted(databases: tuple[ServiceContext, ServiceContext]) -> None:
    original, restored = databases  # the copy, taken as the original restored elsewhere
    label = reconcile.installation_id(original)
    with pytest.raises(installation.InstallationCopied):
        reconcile.installation_id(restored)
    with session_scope(restored.session_factory) as session:
        adopted = installation.adopt(session)
    assert adopted.label == label and not adopted.copied
    assert reconcile.installation_id(restored) == label


def test_the_command_tells_a_copy_and_gives_it_an_id(databases: tuple[ServiceContext, ServiceContext]) -> None:
    original, copy = databases
    env = {"MMS_DATABASE_URL": copy.settings.resolved_database_url, "MMS_DATA_DIR": str(copy.settings.data_dir)}

    def mms(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "admin", "installation", *args],
            env={"PATH": "/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    shown = mms()
    assert shown.returncode == 0, shown.stderr
    assert "is not the one the id was made in" in shown.stderr and "--new-id" in shown.stderr
    both = mms("--new-id", "--adopt")
    assert both.returncode != 0 and "exclude each other" in both.stderr
    made = mms("--new-id", "-o", "json")
    assert made.returncode == 0, made.stderr
    assert '"copied": false' in made.stdout
    assert _state(copy).label != _state(original).label and not _state(copy).copied
