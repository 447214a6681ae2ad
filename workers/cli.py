"""The build workers' `mms` commands: `mms worker` and `mms base-image publish`.

They run the build pipeline, so they live here rather than in `app/cli/` (`app` never imports
`workers`); they join the `mms` command through the `mms.commands` entry point ``register``.
`python -m workers` is the whole `mms` whatever the installed entry points say: `mms serve`
starts its build worker as `python -m workers worker`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from app.cli.main import fail, load_settings, prepare_database
from mms_client.cli import BASE_IMAGE_HELP, require_installed, subgroup
from mms_client.output import err

# Without the `server` extra these commands are not offered.
require_installed("celery", "docker", "sqlalchemy")


def worker(
    concurrency: Annotated[int, typer.Option(help="builds run at once in this worker")] = 1,
    beat: Annotated[
        bool,
        typer.Option(
            help="also run the reaper's and the image store's garbage collection schedules (safe on every worker)"
        ),
    ] = True,
    deploy: Annotated[
        bool,
        typer.Option(
            "--deploy",
            help="run the web services' reconciler instead of builds (its own queue and schedule; "
            "passes are short: --concurrency 2 serves hundreds of services)",
        ),
    ] = False,
) -> None:
    """Run a build worker, or with --deploy a web-service reconciler (Celery on MMS_BROKER_URL).

    Example: DOCKER_HOST=unix:///var/run/docker.sock mms worker --concurrency 2
    """
    from app.config import get_settings

    settings = load_settings()
    if not settings.public_url and settings.service_url != settings.resolved_public_url:
        # The service's own asset URLs, its image store's address: where `mms serve` said it
        # serves. Celery's processes read their settings from the environment.
        os.environ["MMS_PUBLIC_URL"] = settings.service_url
        get_settings.cache_clear()
        settings = load_settings()
        err.print(
            f"Build worker: the service is at {settings.resolved_public_url} "
            f"(recorded by `mms serve` in {settings.served_url_file})",
            highlight=False,
        )
    prepare_database(settings)
    from app.log_config import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from workers.celery_app import BUILD_SCHEDULE, DEPLOY_SCHEDULE, celery_app
    from workers.deploy.pass_slots import MIN_THREADS

    queue = settings.deploy_queue if deploy else settings.build_queue
    celery_app.conf.beat_schedule = DEPLOY_SCHEDULE if deploy else BUILD_SCHEDULE
    argv = ["worker", f"--queues={queue}", "--loglevel=INFO"]
    if deploy:  # beside a build worker (celery@<host>, what the compose healthcheck pings)
        argv.append("--hostname=deploy@%h")
    # A pass waits on the engine and the database, never on the CPU: threads, not processes.
    # At least MIN_THREADS: the schedule and the sweep have threads of their own, the operator's
    # targets' passes some beside the tenants' (workers.deploy.pass_slots).
    threads = max(concurrency, MIN_THREADS)
    argv += ["--pool=threads", f"--concurrency={threads}"] if deploy else [f"--concurrency={concurrency}"]
    if beat:
        # Every worker may run the schedule: each reaper pass, each handing out of due
        # services, is idempotent.
        schedule = "celerybeat-schedule" if not deploy else "celerybeat-schedule-deploy"
        argv += ["--beat", f"--schedule={settings.data_dir / schedule}"]
    celery_app.worker_main(argv)


def publish_base_image(
    rootfs_tar: Annotated[
        Path | None, typer.Option(help="a root file system tarball; default: build one with debootstrap")
    ] = None,
    python_version: Annotated[
        str | None, typer.Option(help="the Python the root file system must carry; default: whatever it does")
    ] = None,
    release: Annotated[
        str | None,
        typer.Option(
            help="the Debian release to build: bullseye (Python 3.9), bookworm (3.11, the default) or "
            "trixie (3.13); with --rootfs-tar, the one it must be"
        ),
    ] = None,
    if_missing: Annotated[
        bool, typer.Option("--if-missing", help="do nothing when a base image of this variant is already published")
    ] = False,
    variant: Annotated[
        str,
        typer.Option(
            help="cpu (the default FROM), spark (plus a headless Java 17, the SparkPython runtime's default FROM), "
            "or gpu (plus Debian's CUDA runtime, the FROM of manifests with enableGpu)"
        ),
    ] = "cpu",
) -> None:
    """Build the minimal CPU inference base image (Debian, python3, pip, CA certificates), or
    its Spark variant, and push it to MMS_REGISTRY, or into the service's own image store. No
    Docker engine is needed.

    Tagged py<ver>-<date> and py<ver>; the bookworm cpu base is also `latest` and the default
    FROM of manifests that name no base. Bases of the other releases are listed as the
    cpu-<release> variant and used by naming them (baseImage: <registry>/mms/inference-base:py3.9).

    Example: mms base-image publish --if-missing; mms base-image publish --release bullseye;
    mms base-image publish --variant spark
    """
    import re
    import subprocess

    from app.database import make_engine, make_session_factory, session_scope
    from app.services.base_images import default_base_image, record_base_image
    from workers.base_image import DEFAULT_RELEASE, RELEASES, debian_release
    from workers.base_image import publish_base_image as publish
    from workers.oci.remote_registry import RemoteRegistryError
    from workers.pipeline import image_store

    if variant not in ("cpu", "spark", "gpu"):
        fail(f"--variant must be cpu, spark or gpu, not {variant!r}")
    if release is not None and release not in RELEASES:
        fail(f"--release must be one of {', '.join(RELEASES)}, not {release!r}")
    if variant == "spark" and release not in (None, DEFAULT_RELEASE):
        fail(f"--variant spark is built on {DEFAULT_RELEASE} only (its Java 17)")
    if variant == "gpu" and release not in (None, DEFAULT_RELEASE):
        fail(f"--variant gpu is built on {DEFAULT_RELEASE} only (its CUDA runtime)")
    if rootfs_tar is not None:
        try:
            found = debian_release(rootfs_tar)
        except (ValueError, OSError) as exc:
            fail(f"--rootfs-tar: {exc}")
        if release is not None and found != release:
            fail(f"--rootfs-tar {rootfs_tar.name} is of release {found or 'unknown'}, not {release}")
        release = found
    else:
        release = release or DEFAULT_RELEASE
    # Another release's base is listed, and named by builds, but never the default FROM.
    recorded_as = variant if release in (None, DEFAULT_RELEASE) else f"{variant}-{release}"
    settings = load_settings()
    prepare_database(settings)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    if if_missing:
        with session_scope(factory) as session:
            existing = default_base_image(session, variant=recorded_as)
        if existing:
            err.print(f"base image {existing} is already published", highlight=False)
            engine.dispose()
            return
    if rootfs_tar is None:
        # debootstrap, cached under /var/cache/mms so it runs once per machine.
        err.print("building a Debian root file system with debootstrap (once per machine, about a minute)")
        name = {"spark": "spark-rootfs.sh", "gpu": "gpu-rootfs.sh"}.get(variant, "base-rootfs.sh")
        script = Path(__file__).resolve().parents[1] / "scripts" / "infra" / name
        env = {**os.environ, "MMS_ROOTFS_SUITE": release}
        done = subprocess.run([str(script)], capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            fail(f"building the root file system failed: {done.stderr.strip()[-500:]}")
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
        fail(f"publishing the base image failed: {exc}")
    carried = re.search(r":py(\d+\.\d+)", reference)
    with session_scope(factory) as session:
        record_base_image(
            session,
            reference=reference,
            python_version=carried[1] if carried else python_version or "",
            variant=recorded_as,
        )
    engine.dispose()
    if recorded_as != variant:
        err.print(f"published {reference} (variant {recorded_as}); name it as a manifest's baseImage", highlight=False)
        return
    runtime = {"spark": "of SparkPython manifests", "gpu": "of manifests with enableGpu"}.get(variant, "")
    err.print(f"published {reference}; it is now the default base image {runtime}".rstrip(), highlight=False)


def import_base_image(
    source: Annotated[
        str,
        typer.Argument(
            help="a docker-archive (docker save), an oci-archive (an OCI layout in a tar), or an image "
            "reference in a registry the service may reach (its fetch policy); docker-archive:, "
            "oci-archive: and docker:// prefixes are accepted"
        ),
    ],
    name: Annotated[
        str, typer.Option("--name", help="NAME[:TAG]: the image lands at <registry>/mms/imported/NAME:TAG (latest)")
    ],
    platform: Annotated[
        str, typer.Option(help="the image to take from a multi-platform index, os/architecture")
    ] = "linux/amd64",
    max_size_mb: Annotated[
        int, typer.Option(help="refuse an archive (or image) larger than this, its layers read and uncompressed")
    ] = 20480,
    username: Annotated[str | None, typer.Option(help="a login for the source registry")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the source registry's password from standard input")
    ] = False,
) -> None:
    """Bring an image (a miniconda base built with your own engine, say) into the service's
    image store, or MMS_REGISTRY, as a base builds of every account may name.

    The archive is checked before anything is stored: plain files only (no links, no '..'),
    bounded sizes, every blob's sha256 and every layer's diff_id. Plain tar layers are
    gzipped; the config is labelled with the image's Python so builds need not scan it.

    Example: docker save my-miniconda:1 -o base.tar; mms base-image import base.tar --name miniconda:1
    (then baseImage: <registry>/mms/imported/miniconda:1)
    """
    import sys

    from app.database import make_engine, make_session_factory, session_scope
    from app.services.base_images import IMPORTED, record_base_image
    from workers.image_import import ImportLimits, ImportRefused, import_archive, import_reference, imported_repository
    from workers.oci.remote_registry import RemoteRegistryError
    from workers.pipeline import fetch_policy, image_store

    try:
        repository, tag = imported_repository(name)
    except ImportRefused as exc:
        fail(str(exc))
    wanted = tuple(platform.split("/"))
    if len(wanted) != 2 or not all(wanted):
        fail(f"--platform must be os/architecture (linux/amd64), not {platform!r}")
    if max_size_mb <= 0:
        fail("--max-size-mb must be positive")
    if bool(username) != password_stdin:
        fail("--username and --password-stdin go together (a password is never given on the command line)")
    login = (username, sys.stdin.readline().rstrip("\n")) if username else None
    limits = ImportLimits(max_bytes=max_size_mb << 20)
    kind, _, rest = source.partition(":")
    archive = Path(rest) if kind in ("docker-archive", "oci-archive") else Path(source)
    settings = load_settings()
    prepare_database(settings)

    def show(line: str) -> None:
        err.print(line, highlight=False)

    try:
        with image_store(settings) as store:
            if archive.is_file():
                done = import_archive(
                    store, settings.image_registry, archive, repository, tag, show, platform=wanted, limits=limits
                )
            elif kind in ("docker-archive", "oci-archive") or archive.exists() or source.startswith(("/", ".")):
                fail(f"{source}: no such archive file")
            else:
                done = import_reference(
                    store,
                    settings.image_registry,
                    source.removeprefix("docker://"),
                    repository,
                    tag,
                    show,
                    policy=fetch_policy(settings),
                    login=login,
                    platform=wanted,
                    limits=limits,
                )
    except ImportRefused as exc:
        fail(f"import refused: {' '.join(str(exc).split())}")  # one line, whatever a library said
    except (RemoteRegistryError, OSError) as exc:
        fail(f"importing the image failed: {' '.join(str(exc).split())}")
    engine = make_engine(settings)
    with session_scope(make_session_factory(engine)) as session:
        record_base_image(session, reference=done.reference, python_version=done.python_version or "", variant=IMPORTED)
    engine.dispose()
    err.print(f"imported {done.reference} {done.digest}; name it as a manifest's baseImage", highlight=False)


def register(cli: typer.Typer) -> None:
    """Add the workers' commands to the `mms` command (the `mms.commands` entry point)."""
    cli.command()(worker)
    group = subgroup(cli, "base-image", BASE_IMAGE_HELP)
    group.command("publish")(publish_base_image)
    group.command("import")(import_base_image)
