"""The `mms` command: run the service, migrate its database, administer it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.engine import make_url

from app.cli.client.output import err
from app.config import Settings, get_settings
from app.database import DatabaseNotMigrated, ensure_migrated, make_engine, migrate, session_scope
from app.errors import ServiceError

cli = typer.Typer(help="Model Management Service", no_args_is_help=True, pretty_exceptions_enable=False)
db_cli = typer.Typer(help="The service's database.", no_args_is_help=True)
admin_cli = typer.Typer(help="Administration: the first Owner, role grants.", no_args_is_help=True)
cli.add_typer(db_cli, name="db")
cli.add_typer(admin_cli, name="admin")
base_image_cli = typer.Typer(help="The prebuilt inference base images.", no_args_is_help=True)
cli.add_typer(base_image_cli, name="base-image")
images_cli = typer.Typer(help="Administration of the embedded image store.", no_args_is_help=True)
cli.add_typer(images_cli, name="images")


class Output(str, Enum):
    text = "text"
    json = "json"


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        _fail(f"bad settings: {exc}")
        raise  # unreachable


def _prepare_database(settings: Settings) -> None:
    """Migrate when this database migrates itself, else refuse an unmigrated one."""
    engine = make_engine(settings)
    try:
        if settings.should_auto_migrate:
            migrate(engine)
        else:
            ensure_migrated(engine)
    except DatabaseNotMigrated as exc:
        _fail(str(exc))
    finally:
        engine.dispose()


@cli.command()
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

    # Worker processes read their settings from the environment: hand the options down.
    for name, value in (("MMS_HOST", host), ("MMS_PORT", port), ("MMS_WORKERS", workers)):
        if value is not None:
            os.environ[name] = str(value)
    get_settings.cache_clear()
    settings = _settings()
    _prepare_database(settings)
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
    worker = None
    if settings.is_embedded_broker if build_worker is None else build_worker:
        from app.cli.supervisor import ChildProcess

        err.print(
            f"Build worker: started by this command (broker {_broker_name(settings)}, "
            f"images stored at {settings.image_registry if settings.registry else settings.image_store_dir})",
            highlight=False,
        )
        worker = ChildProcess("build-worker", [sys.executable, "-m", "app.cli", "worker"])
        # Once the API listens: a build fetches its assets from this service's own store.
        worker.start(ready=lambda: _listening(settings.host, settings.port))
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
    try:
        uvicorn.run(
            "app.main:app_factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            proxy_headers=True,
            timeout_graceful_shutdown=30,
        )
    finally:
        if worker is not None:
            worker.stop()


def _listening(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _broker_name(settings: Settings) -> str:
    if settings.is_embedded_broker:
        return f"embedded, {settings.data_dir / 'broker.sqlite'}"
    return (
        make_url(settings.resolved_broker_url).render_as_string(hide_password=True)
        if "://" in settings.resolved_broker_url
        else "configured"
    )


@cli.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="builds run at once in this worker")] = 1,
    beat: Annotated[
        bool,
        typer.Option(
            help="also run the reaper's and the image store's garbage collection schedules (safe on every worker)"
        ),
    ] = True,
) -> None:
    """Run a build worker (Celery on MMS_BROKER_URL).

    Example: DOCKER_HOST=unix:///var/run/docker.sock mms worker --concurrency 2
    """
    settings = _settings()
    if not settings.public_url and settings.service_url != settings.resolved_public_url:
        # The service's own asset URLs, its image store's address: where `mms serve` said it
        # serves. Celery's processes read their settings from the environment.
        os.environ["MMS_PUBLIC_URL"] = settings.service_url
        get_settings.cache_clear()
        settings = _settings()
        err.print(
            f"Build worker: the service is at {settings.resolved_public_url} "
            f"(recorded by `mms serve` in {settings.served_url_file})",
            highlight=False,
        )
    _prepare_database(settings)
    from app.log_config import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from workers.celery_app import celery_app

    argv = ["worker", f"--concurrency={concurrency}", f"--queues={settings.build_queue}", "--loglevel=INFO"]
    if beat:
        # Every worker may run the schedule: each reaper pass is idempotent.
        argv += ["--beat", f"--schedule={settings.data_dir / 'celerybeat-schedule'}"]
    celery_app.worker_main(argv)


@base_image_cli.command("publish")
def publish_base_image(
    rootfs_tar: Annotated[
        Path | None, typer.Option(help="a root file system tarball; default: build one with debootstrap")
    ] = None,
    python_version: Annotated[str, typer.Option(help="the Python the root file system carries")] = "3.11",
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="do nothing when a base image of this variant is already published")
    ] = False,
    variant: Annotated[
        str,
        typer.Option(
            help="cpu (the default FROM), or spark (plus a headless Java 17, the SparkPython runtime's default FROM)"
        ),
    ] = "cpu",
) -> None:
    """Build the minimal CPU inference base image (Debian, python3, pip, CA certificates), or
    its Spark variant, and push it to MMS_REGISTRY, or into the service's own image store. No
    Docker engine is needed.

    Example: mms base-image publish --if-missing; mms base-image publish --variant spark
    """
    import subprocess

    from app.database import make_session_factory
    from app.services.base_images import default_base_image, record_base_image
    from workers.base_image import publish_base_image as publish
    from workers.oci.remote_registry import RemoteRegistryError
    from workers.pipeline import image_store

    if variant not in ("cpu", "spark"):
        _fail(f"--variant must be cpu or spark, not {variant!r}")
    settings = _settings()
    _prepare_database(settings)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    if if_missing:
        with session_scope(factory) as session:
            existing = default_base_image(session, variant=variant)
        if existing:
            err.print(f"base image {existing} is already published", highlight=False)
            engine.dispose()
            return
    if rootfs_tar is None:
        # debootstrap, cached under /var/cache/mms so it runs once per machine.
        err.print("building a Debian root file system with debootstrap (once per machine, about a minute)")
        name = "spark-rootfs.sh" if variant == "spark" else "base-rootfs.sh"
        script = Path(__file__).resolve().parents[2] / "scripts" / "infra" / name
        done = subprocess.run([str(script)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            _fail(f"building the root file system failed: {done.stderr.strip()[-500:]}")
        rootfs_tar = Path(done.stdout.strip().splitlines()[-1])
    try:
        with image_store(settings) as store:
            reference = publish(
                store,
                settings.image_registry,
                rootfs_tar,
                python_version,
                lambda line: err.print(line, highlight=False),
                variant=variant,
            )
    except (RemoteRegistryError, ValueError, OSError) as exc:
        _fail(f"publishing the base image failed: {exc}")
    with session_scope(factory) as session:
        record_base_image(session, reference=reference, python_version=python_version, variant=variant)
    engine.dispose()
    runtime = "of SparkPython manifests" if variant == "spark" else ""
    err.print(f"published {reference}; it is now the default base image {runtime}".rstrip(), highlight=False)


@images_cli.command("gc")
def images_gc(
    grace_seconds: Annotated[
        int | None,
        typer.Option(
            min=60,
            help="spare what was touched this recently, at least 60 s: a build pushing now keeps its blobs [MMS_IMAGE_GC_GRACE_SECONDS]",
        ),
    ] = None,
) -> None:
    """Remove the embedded store's blobs that no tag reaches (deleted images' layers), and
    tags whose image was deleted but not untagged.

    Example: mms images gc --grace-seconds 3600
    """
    from app.database import make_session_factory
    from app.services.image_store import collect_garbage

    settings = _settings()
    if not settings.is_embedded_registry:
        _fail(
            f"images are in the registry {settings.registry}, not the embedded store: "
            "collect its garbage with the registry's own tool"
        )
    _prepare_database(settings)  # which images still exist decides which tags stay
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
    settings = _settings()
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
    from app.services.principals import bootstrap_owner

    settings = _settings()
    _prepare_database(settings)
    engine = make_engine(settings)
    from app.database import make_session_factory

    try:
        with session_scope(make_session_factory(engine)) as session:
            principal, secret = bootstrap_owner(session, issuer=settings.issuer)
    except ServiceError as exc:
        _fail(exc.message)
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

    Example: mms admin grant --issuer https://login.example/tenant/v2.0 --subject 1234 --role Reader --scope /subscriptions/s1
    """
    from app.database import make_session_factory
    from app.services.principals import grant_role

    settings = _settings()
    _prepare_database(settings)
    engine = make_engine(settings)
    try:
        with session_scope(make_session_factory(engine)) as session:
            assignment = grant_role(session, issuer=issuer or settings.issuer, subject=subject, role=role, scope=scope)
    except ServiceError as exc:
        _fail(exc.message)
    finally:
        engine.dispose()
    err.print(f"granted {assignment.role} on {assignment.scope} to {subject}")


def _add_client_commands() -> None:
    """The client side: what a user runs against a service, as `az ml` does."""
    from app.cli.client.accounts import account_cli
    from app.cli.client.images import image_cli, list_base_images
    from app.cli.client.manifests import manifest_cli
    from app.cli.client.models import model_cli
    from app.cli.client.session import env_cli, login, logout

    cli.command("login")(login)
    cli.command("logout")(logout)
    cli.add_typer(env_cli, name="env")
    cli.add_typer(account_cli, name="account")
    cli.add_typer(model_cli, name="model")
    cli.add_typer(manifest_cli, name="manifest")
    cli.add_typer(image_cli, name="image")
    base_image_cli.command("list")(list_base_images)


_add_client_commands()


def main() -> None:
    """Run the command; a failure is one line and a non-zero exit, a traceback only with --debug.

    Usage errors, --help and exit codes are click's own (standalone mode); what escapes it is ours.
    """
    from app.cli.client.api import CliError
    from app.cli.client.profile import ProfileError

    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    try:
        cli()
    except (CliError, ProfileError) as exc:
        if debug:
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:
        if debug:
            raise
        err.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {exc} (run again with --debug for the details)",
            highlight=False,
        )
        sys.exit(1)
