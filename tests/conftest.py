"""Fixtures shared by every test: a migrated database, the app, callers with real tokens.

The database is PostgreSQL when MMS_TEST_DATABASE_URL names one (the test command makes a
throw-away database), else a SQLite file. Each test runs inside a transaction that is
rolled back at its end; the app's sessions join it through savepoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, TrustedIssuer
from app.context import ServiceContext
from app.database import migrate, refuse_writes
from app.main import create_app
from tests.external_issuer import ExternalIssuer
from tests.factories import Callers

# Fails the session when a process a test started outlives it (see the module).
pytest_plugins = ["tests.leftover_processes"]

EXTERNAL_ISSUER = "https://login.example.test/tenant-1/v2.0"
# The engine lane (scripts/test): every test that drives the Docker engine, buildah or the workers;
# the other lane (the API, the services, the clients, and the faults, which run a PostgreSQL, Redis
# and registry of their own) shares none of their state and runs beside it. A test elsewhere that
# uses the shared engine joins the engine lane by its fixture.
ENGINE_LANE_PATHS = ("tests/workers/", "tests/packaging/")
ENGINE_LANE_FIXTURES = {"infra", "docker_env"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--lane",
        choices=("engine", "other"),
        help="run one lane alone: engine (the tests that use the Docker engine or the workers), or other",
    )


def in_engine_lane(item: pytest.Item) -> bool:
    return item.nodeid.startswith(ENGINE_LANE_PATHS) or not ENGINE_LANE_FIXTURES.isdisjoint(item.fixturenames)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if lane := config.getoption("lane"):
        keep, other = [], []
        for item in items:
            (keep if in_engine_lane(item) == (lane == "engine") else other).append(item)
        config.hook.pytest_deselected(items=other)
        items[:] = keep
    if (os.environ.get("MMS_TEST_DATABASE_URL") or "").startswith("postgresql"):
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL (set MMS_TEST_DATABASE_URL)")
    for item in items:
        if "postgres_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def azure_connection_string() -> str:
    """Azurite's connection string (scripts/test starts Azurite and sets it)."""
    value = os.environ.get("MMS_TEST_AZURE_CONNECTION_STRING")
    if not value:
        pytest.skip("needs Azurite: run scripts/azurite and set MMS_TEST_AZURE_CONNECTION_STRING")
    return value


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mms-data")


@pytest.fixture(scope="session")
def external_issuer() -> Iterator[ExternalIssuer]:
    with ExternalIssuer.serve(EXTERNAL_ISSUER) as issuer:
        yield issuer


@pytest.fixture(scope="session")
def settings(data_dir: Path, external_issuer: ExternalIssuer) -> Settings:
    return Settings(
        env="development",
        data_dir=data_dir,
        database_url=os.environ.get("MMS_TEST_DATABASE_URL") or f"sqlite:///{data_dir / 'test.db'}",
        secret_key="test-secret-key-that-is-long-enough-0123456789",
        log_format="text",
        trusted_issuers=[TrustedIssuer(issuer=EXTERNAL_ISSUER, jwks_uri=external_issuer.jwks_uri)],
        jwks_refresh_min_seconds=0,
        auth_cache_seconds=0,  # tests change roles and expect the next request to see it
        # API tests ring queues of their own that no worker listens to, on a Redis database a test
        # session beside this one can be given another of (scripts/test runs two).
        broker_url=os.environ.get("MMS_TEST_API_REDIS_URL", "redis://127.0.0.1:6379/15"),
        build_queue=f"mms-api-tests-{os.getpid()}",
        deploy_queue=f"mms-api-deploys-{os.getpid()}",
        registry="127.0.0.1:5000",
        web_services_preview=True,
    )


@pytest.fixture(scope="session")
def service_context(settings: Settings) -> Iterator[ServiceContext]:
    context = ServiceContext.build(settings)
    migrate(context.engine)
    context.signing_key()  # committed once, outside every test's transaction
    yield context
    context.dispose()


@pytest.fixture()
def db(service_context: ServiceContext) -> Iterator[Session]:
    """A session inside a transaction that is rolled back when the test ends."""
    connection = service_context.engine.connect()
    outer = connection.begin()
    factory = sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    session = factory()
    session.info["factory"] = factory
    # What the service reads with: the same transaction, but any write through it is a bug.
    session.info["read_factory"] = refuse_writes(
        sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    )
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture()
def app_context(service_context: ServiceContext, db: Session) -> ServiceContext:
    """The service context with sessions that join the test's transaction."""
    return ServiceContext.build(
        service_context.settings,
        engine=service_context.engine,
        session_factory=db.info["factory"],
        read_session_factory=db.info["read_factory"],
    )


@pytest.fixture()
def client(app_context: ServiceContext) -> Iterator[TestClient]:
    # Not entered as a context manager: the start-up checks run on their own connection,
    # which SQLite's lock would keep waiting behind the test's open transaction.
    yield TestClient(create_app(context=app_context), base_url="http://testserver")


@pytest.fixture()
def callers(client: TestClient, db: Session, app_context: ServiceContext) -> Callers:
    return Callers(client=client, session=db, issuer=app_context.settings.issuer)


@pytest.fixture(scope="session")
def infra(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The Docker engine, the build network, the two registries and the base image (tests/infra.py)."""
    from tests.infra import running_infra  # here: pytest loads tests.leftover_processes, which it uses, first

    yield from running_infra(request)
