"""The server's `mms` commands: run the service, migrate its database, administer it.

They join the client's `mms` command (`mms_client.cli`) through the `mms.commands` entry point
``register``; the commands that run the build pipeline (`mms worker`, `mms base-image publish`)
are the workers' own (`workers/cli.py`): this package never imports `workers`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from mms_client.cli import require_installed
from mms_client.output import err

# Without the `server` extra these commands are not offered (imported in the commands, not here).
require_installed("sqlalchemy", "fastapi", "uvicorn", "alembic", "pydantic_settings")

if TYPE_CHECKING:
    from app.config import Settings

# What a command needs (settings, the database, FastAPI's errors) is imported in the command:
# `mms --help` and every client command load this module, and must start fast.

db_cli = typer.Typer(help="The service's database.", no_args_is_help=True)
admin_cli = typer.Typer(help="Administration: the first Owner, role grants.", no_args_is_help=True)
images_cli = typer.Typer(help="Administration of the embedded image store.", no_args_is_help=True)


class Output(str, Enum):
    text = "text"
    json = "json"


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def load_settings() -> Settings:
    from app.config import get_settings

    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        fail(f"bad settings: {exc}")
        raise  # unreachable


def prepare_database(settings: Settings) -> None:
    """Migrate when this database migrates itself, else refuse an unmigrated one."""
    from app.database import DatabaseNotMigrated, ensure_migrated, make_engine, migrate

    engine = make_engine(settings)
    try:
        if settings.should_auto_migrate:
            migrate(engine)
        else:
            ensure_migrated(engine)
    except DatabaseNotMigrated as exc:
        fail(str(exc))
    finally:
        engine.dispose()


def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on [MMS_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on [MMS_PORT]")] = None,
    workers: Annotated[int | None, typer.Option(help="API processes [MMS_WORKERS]")] = None,
    build_worker: Annotated[
        bool | None,
        typer.Option(
            "--build-worker/--no-build-worker",
            help="also run a build worker (default: only with the embedded broker, no MMS_BROKER_URL)",
        ),
    ] = None,
) -> None:
    """Run the API server (and, in the embedded default, its build worker).

    Example: mms serve --port 8000
    """
    import uvicorn
    from sqlalchemy.engine import make_url

    from app.config import get_settings

    # Worker processes read their settings from the environment: hand the options down.
    for name, value in (("MMS_HOST", host), ("MMS_PORT", port), ("MMS_WORKERS", workers)):
        if value is not None:
            os.environ[name] = str(value)
    get_settings.cache_clear()
    settings = load_settings()
    prepare_database(settings)
    url = settings.resolved_public_url
    # `mms admin bootstrap` and a separately run `mms worker` read it (Settings.service_url).
    settings.record_served_url()
    err.print(
        f"Model Management Service listening on [bold]{url}[/bold] "
        f"({settings.workers} process{'es' if settings.workers > 1 else ''}, "
        f"database {make_url(settings.resolved_database_url).render_as_string(hide_password=True)})\n"
        "Get a token: [bold]mms admin bootstrap[/bold] prints the first Owner's clientId and "
        "clientSecret (once), then\n"
        f"  curl -s {url}/oauth2/token -d grant_type=client_credentials "
        "-d client_id=<clientId> -d client_secret=<clientSecret>\n"
        f"API docs: {url}/docs",
        highlight=False,
    )
    from app.log_config import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    children = []
    if settings.is_embedded_broker if build_worker is None else build_worker:
        from app.cli.supervisor import ChildProcess

        err.print(
            f"Build worker: started by this command (broker {_broker_name(settings)}, "
            f"images stored at {settings.image_registry if settings.registry else settings.image_store_dir})",
            highlight=False,
        )
        # By module path: `python -m workers` is the whole `mms`, whatever the installed entry points.
        children.append(ChildProcess("build-worker", [sys.executable, "-m", "workers", "worker"]))
        if settings.web_services_preview:
            err.print(
                f"Web services: a deploy worker and the scoring gateway at {settings.scoring_url} started too",
                highlight=False,
            )
            children.append(ChildProcess("deploy-worker", [sys.executable, "-m", "workers", "worker", "--deploy"]))
            children.append(ChildProcess("gateway", [sys.executable, "-m", "workers", "gateway"]))
        for child in children:
            # Once the API listens: a build fetches its assets from this service's own store.
            child.start(ready=lambda: _listening(settings.host, settings.port))
    # uvicorn re-raises the SIGTERM it stopped on once it is done; exit through Python then
    # (status 0: a requested stop that went well), so a build worker is stopped below rather
    # than left to the kernel.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if settings.workers > 1:
        # Each API process writes its request metrics here; /metrics in any of them adds all up.
        metrics_dir = settings.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    config = {
        "app": "app.main:app_factory",
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "proxy_headers": True,
        "timeout_graceful_shutdown": 30,
    }
    try:
        if settings.workers > 1:
            from app.cli.api_processes import run_api_processes

            status = run_api_processes(settings.workers, config)
        else:
            uvicorn.run(**config)
            status = 0
    finally:
        for child in children:
            child.stop()
    if status:
        raise typer.Exit(status)


def gateway(
    host: Annotated[str | None, typer.Option(help="address to listen on [MMS_GATEWAY_HOST]")] = None,
    port: Annotated[
        int | None, typer.Option(help="port to listen on [MMS_GATEWAY_PORT; default: MMS_SCORING_URL's]")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="gateway processes")] = 1,
) -> None:
    """Run the scoring gateway: web services' scoring requests, key-checked, forwarded to their replicas.

    Example: mms gateway --port 8001
    """
    import uvicorn

    from app.config import get_settings

    # Worker processes read their settings from the environment: hand the options down.
    for name, value in (("MMS_GATEWAY_HOST", host), ("MMS_GATEWAY_PORT", port)):
        if value is not None:
            os.environ[name] = str(value)
    get_settings.cache_clear()
    settings = load_settings()
    prepare_database(settings)
    from app.log_config import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    err.print(
        f"Scoring gateway listening on [bold]http://{settings.gateway_host}:{settings.resolved_gateway_port}"
        f"[/bold] (scoring URIs name {settings.scoring_url})",
        highlight=False,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "app.gateway.app:gateway_factory",
        factory=True,
        host=settings.gateway_host,
        port=settings.resolved_gateway_port,
        workers=workers,
        log_config=None,
        access_log=False,  # the gateway logs each request itself, without its headers
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=30,
    )


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _broker_name(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    if settings.is_embedded_broker:
        return f"embedded, {settings.data_dir / 'broker.sqlite'}"
    return (
        make_url(settings.resolved_broker_url).render_as_string(hide_password=True)
        if "://" in settings.resolved_broker_url
        else "configured"
    )


@images_cli.command("gc")
def images_gc(
    grace_seconds: Annotated[
        int | None,
        typer.Option(
            min=60,
            help="spare what was touched this recently, at least 60 s: a build pushing now keeps its blobs"
            " [MMS_IMAGE_GC_GRACE_SECONDS]",
        ),
    ] = None,
) -> None:
    """Remove the embedded store's blobs that no tag reaches (deleted images' layers), and
    tags whose image was deleted but not untagged.

    Example: mms images gc --grace-seconds 3600
    """
    from app.database import make_engine, make_session_factory, session_scope
    from app.services.image_store import collect_garbage

    settings = load_settings()
    if not settings.is_embedded_registry:
        fail(
            f"images are in the registry {settings.registry}, not the embedded store: "
            "collect its garbage with the registry's own tool"
        )
    prepare_database(settings)  # which images still exist decides which tags stay
    engine = make_engine(settings)
    try:
        with session_scope(make_session_factory(engine)) as session:
            done = collect_garbage(session, settings, grace_seconds=grace_seconds)
    finally:
        engine.dispose()
    assert done is not None
    err.print(
        f"removed {done.tags} tag(s) of deleted images, {done.blobs} blob(s) "
        f"({done.bytes} bytes), {done.links} link(s) and {done.staging_files} unfinished "
        f"upload(s) from {settings.image_store_dir}"
    )


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration to MMS_DATABASE_URL (or the embedded SQLite file)."""
    from app.database import make_engine, migrate

    settings = load_settings()
    engine = make_engine(settings)
    migrate(engine)
    err.print(f"database {engine.url.render_as_string(hide_password=True)} is up to date")
    engine.dispose()


@admin_cli.command("bootstrap")
def bootstrap(
    output: Annotated[Output, typer.Option("--output", "-o", help="text or json")] = Output.text,
) -> None:
    """Create the first Owner service principal and print its credentials (shown once).

    Example: mms admin bootstrap -o json
    """
    from app.database import make_engine, session_scope
    from app.errors import ServiceError
    from app.services.principals import bootstrap_owner

    settings = load_settings()
    prepare_database(settings)
    engine = make_engine(settings)
    from app.database import make_session_factory

    try:
        with session_scope(make_session_factory(engine)) as session:
            principal, secret = bootstrap_owner(session, issuer=settings.issuer)
    except ServiceError as exc:
        fail(exc.message)
    finally:
        engine.dispose()
    result = {
        "clientId": principal.client_id,
        "clientSecret": secret,
        # Where the service runs now (`mms serve` records it), not this command's default port.
        "tokenUrl": f"{settings.service_url}/oauth2/token",
    }
    if output is Output.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    Console().print(
        "Created the first Owner (every scope). Keep the secret: it is not shown again.\n"
        f"  clientId:     {result['clientId']}\n"
        f"  clientSecret: {result['clientSecret']}\n"
        f"  tokenUrl:     {result['tokenUrl']}",
        highlight=False,
    )


@admin_cli.command("grant")
def grant(
    subject: Annotated[str, typer.Option(help="the token's oid or sub claim")],
    role: Annotated[str, typer.Option(help="Reader, Contributor or Owner")],
    scope: Annotated[str, typer.Option(help="/subscriptions/{id}[/resourceGroups/{name}[/accounts/{name}]]")],
    issuer: Annotated[str | None, typer.Option(help="the token's iss (default: this service)")] = None,
) -> None:
    """Give a principal of a trusted external issuer a role on a scope.

    Example: mms admin grant --issuer https://login.example/tenant/v2.0 --subject 1234 --role Reader
    --scope /subscriptions/s1
    """
    from app.database import make_engine, make_session_factory, session_scope
    from app.errors import ServiceError
    from app.services.principals import grant_role

    settings = load_settings()
    prepare_database(settings)
    engine = make_engine(settings)
    try:
        with session_scope(make_session_factory(engine)) as session:
            assignment = grant_role(session, issuer=issuer or settings.issuer, subject=subject, role=role, scope=scope)
    except ServiceError as exc:
        fail(exc.message)
    finally:
        engine.dispose()
    err.print(f"granted {assignment.role} on {assignment.scope} to {subject}")


@admin_cli.command("installation")
def installation(
    new_id: Annotated[bool, typer.Option("--new-id", help="this database is a copy: give it an id of its own")] = False,
    adopt: Annotated[
        bool, typer.Option("--adopt", help="this database is the installation's own, restored or moved: keep its id")
    ] = False,
    output: Annotated[Output, typer.Option("--output", "-o", help="text or json")] = Output.text,
) -> None:
    """Show this installation's id (what labels its web services' engine objects) and whether
    its database is the one the id was made in; tell a copy of the database from the original.

    Example: mms admin installation --new-id
    """
    from app.database import make_engine, make_session_factory, session_scope
    from app.deployments import installation as installations

    if new_id and adopt:
        fail("--new-id (a copy) and --adopt (the same installation) exclude each other: choose one")
    settings = load_settings()
    prepare_database(settings)
    engine = make_engine(settings)
    try:
        with session_scope(make_session_factory(engine)) as session:
            before = installations.read(session)
            state = installations.new_id(session) if new_id else installations.adopt(session) if adopt else before
    finally:
        engine.dispose()
    result = {
        "id": state.label,
        "databaseIdentity": state.current,
        "recordedIdentity": state.recorded,
        "copied": state.copied,
    }
    if output is Output.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    if new_id:
        err.print(f"installation {before.label} -> {state.label}: this database is an installation of its own now")
    elif adopt:
        err.print(f"installation {state.label} adopted this database ({state.current})")
    elif state.copied:
        err.print(
            f"installation {state.label}: this database ({state.current}) is not the one the id was made in "
            f"({state.recorded}); web services are neither deployed nor swept until you run "
            "`mms admin installation --new-id` (a copy) or `--adopt` (the same installation, restored or moved)"
        )
    else:
        err.print(f"installation {state.label} in database {state.current}")


def register(cli: typer.Typer) -> None:
    """Add the server's commands to the `mms` command (the `mms.commands` entry point)."""
    cli.command()(serve)
    cli.command()(gateway)
    cli.add_typer(db_cli, name="db")
    cli.add_typer(admin_cli, name="admin")
    cli.add_typer(images_cli, name="images")
