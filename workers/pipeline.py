"""One image build as named steps: fetch → environment → build and push → smoke test.

Every step writes to the build log; a failure ends the log with the step and its reason,
and the image with a one-line error.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import docker
import requests
from sqlalchemy import select

from app.auth.registry_tokens import engine_pull_token
from app.builds.states import SmokeTestResult
from app.config import Settings
from app.context import ServiceContext
from app.database import session_scope
from app.image_store import image_layout, naming
from app.orm import Image, ModelVersion
from app.package_sources import PackageSourceRefused, check_conda_channels, check_requirements
from app.services.base_images import BASE_REPOSITORY, NO_GPU_BASE, default_base_image, foreign_base_image
from workers.build_context import (
    REQUIREMENT_FILES,
    BuildSpec,
    InvalidBuildSpec,
    RegistryCredentials,
    split_conda,
)
from workers.builders import Builder, BuildFailed, BuildResult
from workers.builders.docker import DockerBuilder
from workers.builders.oci import OciBuilder, Store, check_extra_steps
from workers.builders.run_limits import RunLimits
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, fetch, redact_url
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.remote_registry import ImageReference, RemoteRegistryClient
from workers.sandbox import Limits
from workers.scratch import scratch_dir
from workers.smoke_test import SmokeTestFailed, smoke_test
from workers.unpack import UnpackError, unpack_archive

log = logging.getLogger("mms.pipeline")

DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
# The smoke test's pull token outlives its timeout by this much: a large model layer's pull.
# What an engine pull token lives: one image's pull from the service's own /v2/, however large.
ENGINE_PULL_TOKEN_SECONDS = 900
Log = Callable[[str], None]


class StepFailed(Exception):
    """A pipeline step failed; str() is the one-line reason recorded on the image."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str | None
    unpack: bool


@dataclass(frozen=True)
class BuildInputs:
    """What the build needs from the database, read once at its start."""

    image_name: str
    image_version: int
    account_id: uuid.UUID
    builder: str
    driver_program: str
    assets: dict[str, Source]  # asset id → where it is
    models: dict[str, Source]  # "<name>/<version>" → where it is
    conda_url: str | None
    pip_url: str | None
    base_image: str | None
    base_registry: RegistryCredentials | None
    extra_steps: str | None
    labels: dict[str, str]
    published_base: str | None  # the newest base image `mms base-image publish` recorded
    runtime: str = "python"  # the build's name for the manifest's runtimeType
    gpu: bool = False  # enableGpu: the published base is the gpu variant
    source_directory: str | None = None  # the asset unpacked at the app root; the driver is a path in it


def load_inputs(context: ServiceContext, image_id: uuid.UUID) -> BuildInputs:
    """Read the image, its manifest and models; unseal the base registry password."""
    with session_scope(context.session_factory) as session:
        image = session.get(Image, image_id)
        manifest = image.manifest
        model_ids = [m.model_version_id for m in manifest.models]
        models = list(session.scalars(select(ModelVersion).where(ModelVersion.id.in_(model_ids))))
        registry = None
        if manifest.registry_address and manifest.registry_username:
            password = (
                context.sealer.unseal(manifest.sealed_registry_password).decode()
                if manifest.sealed_registry_password
                else ""
            )
            registry = RegistryCredentials(manifest.registry_address, manifest.registry_username, password)
        gpu, asset_ids = manifest.enable_gpu, {a.asset_id for a in manifest.assets}
        labels = {
            "org.mms.manifest.id": str(manifest.id),
            "org.mms.manifest.version": str(manifest.version),
            # No image id or version: they are the tag, so one manifest gives one digest.
            "org.mms.models": ",".join(f"{m.id}:{m.name}:{m.version}" for m in models),
        }
        if gpu:  # on a tenant's base too: they vouch for its CUDA, the label says it was asked for
            labels["org.mms.gpu"] = "true"
        variant = "gpu" if gpu else _BASE_VARIANTS[manifest.runtime_type]
        return BuildInputs(
            image_name=image.name,
            image_version=image.version,
            account_id=image.account_id,
            builder=image.builder,
            driver_program=manifest.driver_program,
            assets={a.asset_id: Source(a.url, None, a.unpack) for a in manifest.assets},
            models={f"{m.name}/{m.version}": Source(m.url, m.sha256, m.unpack) for m in models},
            conda_url=manifest.conda_env_url,
            pip_url=manifest.pip_requirements_url,
            base_image=manifest.base_image,
            base_registry=registry,
            extra_steps=manifest.extra_dockerfile_steps,
            published_base=default_base_image(session, variant=variant),
            runtime=_RUNTIMES[manifest.runtime_type],
            labels=labels,
            gpu=gpu,
            # Manifests from before sourceDirectory named an asset hold a client's path: ignored, as then.
            source_directory=manifest.source_directory if manifest.source_directory in asset_ids else None,
        )


_RUNTIMES = {"Python": "python", "SparkPython": "spark-py"}
_BASE_VARIANTS = {"Python": "cpu", "SparkPython": "spark"}


def _file_name(url: str, fallback: str) -> str:
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    return name if name and name not in (".", "..") else fallback


def fetch_failure(settings: Settings, url: str, exc: FetchError) -> str:
    """The fetcher's reason; for a URL of the service's own store that it refused as a private
    address, also the setting that fixes it (a worker run apart from `mms serve` takes the
    service's address from MMS_PUBLIC_URL, else from its own MMS_HOST/MMS_PORT)."""
    parts = urlsplit(url)
    own = urlsplit(settings.resolved_public_url).netloc
    if exc.reason != "blocked_address" or not parts.path.startswith("/blobs/") or parts.netloc == own:
        return str(exc)
    return (
        f"{exc}: this worker takes the service's own address to be {settings.resolved_public_url}; "
        f"set MMS_PUBLIC_URL={parts.scheme}://{parts.netloc} in the worker's environment (or run "
        "it with the data folder of `mms serve`, which records where it serves)"
    )


def _plain_path(relative: str) -> bool:
    """Whether ``relative`` stays below the directory it is joined to: no '', '.' or '..' part, no '\\'."""
    return "\\" not in relative and all(part not in ("", ".", "..") for part in relative.split("/"))


def fetch_step(
    context: ServiceContext, inputs: BuildInputs, work: Path, emit: Log
) -> tuple[Path, Path, str | None, str | None]:
    """Download every asset and model (unpacking archives), and the environment files."""
    # The API refuses such names; a row from before it did must not write outside the image's tree.
    for what, name in [*(("asset", a) for a in inputs.assets), *(("model", m) for m in inputs.models)]:
        if not _plain_path(name):
            raise StepFailed("fetch", f"{what} '{name}' is not a plain name; register it under another name")
    policy = fetch_policy(context.settings)
    app_dir, model_dir = work / "app", work / "models"

    def get(source: Source, dest: Path, what: str) -> Path:
        emit(f"mms: fetching {what} from {redact_url(source.url)}")
        try:
            result = fetch(source.url, dest, policy=policy, expected_sha256=source.sha256)
        except FetchError as exc:
            raise StepFailed("fetch", f"{what}: {fetch_failure(context.settings, source.url, exc)}") from None
        emit(f"mms: fetched {what}: {result.size} bytes, sha256 {result.sha256}")
        return result.path

    def place(source: Source, target: Path, file_name: str, what: str) -> None:
        if not source.unpack:
            target.mkdir(parents=True, exist_ok=True)
            get(source, target / file_name, what)
            return
        archive = get(source, work / f"download-{uuid.uuid4().hex}", what)
        try:
            unpack_archive(archive, target)
        except UnpackError as exc:
            raise StepFailed("fetch", f"{what}: {exc}") from None
        finally:
            archive.unlink(missing_ok=True)

    directory = inputs.source_directory
    for asset_id, source in inputs.assets.items():
        if asset_id == directory:
            continue  # last: its tree may not overwrite another asset (the unpacker refuses clashes)
        if directory is not None and source.url == inputs.conda_url:
            continue  # the environment, read below; the directory holds its own copy
        # The driver becomes <id>.py so the scoring server can import it by path.
        name = asset_id if asset_id != inputs.driver_program or asset_id.endswith(".py") else f"{asset_id}.py"
        place(source, app_dir if not source.unpack else app_dir / asset_id, name, f"asset '{asset_id}'")
    if directory is not None:
        _place_source_directory(inputs, app_dir, place)
    for key, source in inputs.models.items():
        place(source, model_dir / key, _file_name(source.url, "model"), f"model {key}")

    texts = []
    for url, what in ((inputs.conda_url, "conda file"), (inputs.pip_url, "pip requirements")):
        if url is None:
            texts.append(None)
            continue
        path = get(Source(url, None, False), work / f"env-{uuid.uuid4().hex}", what)
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise StepFailed("fetch", f"the {what} is not UTF-8 text") from None
    return app_dir, model_dir, texts[0], texts[1]


def _place_source_directory(inputs: BuildInputs, app_dir: Path, place: Callable[..., None]) -> None:
    """Unpack the sourceDirectory archive at the app root, as its tree, and check the entry
    script is in it (a row from before the API checked the path is held here too)."""
    directory, entry = inputs.source_directory, inputs.driver_program
    source = inputs.assets.get(directory or "")
    if source is None or not source.unpack:
        raise StepFailed("fetch", f"sourceDirectory '{directory}' is not an archive asset with unPack")
    if not _plain_path(entry):
        raise StepFailed("fetch", f"entryScript '{entry}' is not a plain path inside the sourceDirectory")
    app_dir.mkdir(parents=True, exist_ok=True)
    place(source, app_dir, "", f"sourceDirectory '{directory}'")
    if not (app_dir / entry).is_file():
        raise StepFailed("fetch", f"entryScript '{entry}' is not a file in the sourceDirectory archive '{directory}'")


def driver_file(inputs: BuildInputs) -> str:
    name = inputs.driver_program
    if inputs.source_directory is not None:
        return name  # a path inside the source directory, kept as given
    return name if name.endswith(".py") else f"{name}.py"


def image_repository(inputs: BuildInputs) -> str:
    """``<account id>/<image name>``: one registry serves every account without collisions."""
    return naming.image_repository(inputs.account_id, inputs.image_name)


def registry_login(settings: Settings) -> dict[str, str] | None:
    """The service's own registry login, or None for an open registry."""
    if not settings.registry_username:
        return None
    return {"username": settings.registry_username, "password": settings.registry_password or ""}


def sandbox_limits(settings: Settings) -> Limits:
    return Limits(
        cpu_seconds=settings.sandbox_cpu_seconds,
        memory_bytes=settings.sandbox_memory_mb << 20,
        processes=settings.sandbox_processes,
        file_bytes=settings.sandbox_disk_mb << 20,
        disk_bytes=settings.sandbox_disk_mb << 20,
        wall_seconds=settings.sandbox_wall_seconds,
    )


def run_limits(settings: Settings) -> RunLimits:
    """What a build's RUN steps may use, on either builder (``MMS_BUILD_RUN_*``)."""
    return RunLimits(
        memory_mb=settings.build_run_memory_mb,
        pids=settings.build_run_pids,
        disk_mb=settings.build_run_disk_mb,
        seconds=settings.build_run_seconds,
        cpu_seconds=settings.build_run_cpu_seconds,
    )


def make_builder(settings: Settings, name: str, *, context: ServiceContext | None = None) -> Builder:
    """The named builder, pushing to the registry, or into the embedded image store.

    Base images come from its own registry or where the fetch policy allows (a manifest's
    baseImage is a tenant's choice of host). The docker builder on the embedded default needs
    ``context``: its engine pulls the base from the service's own ``/v2/`` with a token.
    """
    auth = registry_login(settings)
    policy = fetch_policy(settings)
    if name == "oci":
        layout = image_layout(settings) if settings.is_embedded_registry else None
        return OciBuilder(
            settings.image_registry,
            auth,
            cache_dir=settings.resolved_build_cache_dir,
            layout=layout,
            policy=policy,
            index_url=settings.pip_index_url,
            sandbox=sandbox_limits(settings),
            registry_retry_seconds=settings.registry_retry_seconds,
            conda_channels=settings.conda_channels,
            run_limits=run_limits(settings),
            conda_environments_kept=settings.conda_environments_kept,
            build_proxy=settings.build_proxy,
        )
    docker_host, store, pull_token = settings.docker_host, None, None
    if settings.is_embedded_registry:
        # No registry to push to: the engine's image is exported into the service's own store.
        docker_host, missing = local_engine(settings)
        if docker_host is None:
            raise StepFailed("environment", f"the docker builder needs a Docker engine: {missing}; or use builder: oci")
        if context is None:
            raise ValueError("the docker builder on the embedded image store needs the service context")
        store = ImageStoreClient(image_layout(settings), settings.image_registry)

        def pull_token(repository: str) -> str:
            return engine_pull_token(context, repository, ttl_seconds=ENGINE_PULL_TOKEN_SECONDS)

    limits = run_limits(settings)
    return DockerBuilder(
        docker_host,
        settings.image_registry,
        auth,
        policy=policy,
        network=settings.build_network,
        proxy=settings.build_proxy,
        run_limits=limits,
        store=store,
        pull_token=pull_token,
    )


def image_store(settings: Settings) -> Store:
    """Where images go: the registry with the service's login, or the embedded store."""
    if settings.is_embedded_registry:
        return ImageStoreClient(image_layout(settings), settings.image_registry)
    login = registry_login(settings) or {}
    return RemoteRegistryClient(settings.image_registry.partition("/")[0], login.get("username"), login.get("password"))


def default_base(settings: Settings, published: str | None, runtime: str = "python", *, gpu: bool = False) -> str:
    """The base image a manifest that names none builds on: for SparkPython the newest
    published spark variant, with enableGpu the newest gpu one (MMS_DEFAULT_BASE_IMAGE, a
    plain Python base, is used for neither). A gpu build never falls back to a CPU base."""
    spark = runtime == "spark-py"
    if gpu and not published:
        raise StepFailed("pull-base", f"enableGpu: {NO_GPU_BASE}")
    if settings.default_base_image and not spark and not gpu:
        return settings.default_base_image
    if not published:
        return f"{settings.image_registry}/{BASE_REPOSITORY}:py3.11{'-spark' if spark else ''}"
    ref = ImageReference.parse(published)
    if settings.is_embedded_registry and ref.repository == BASE_REPOSITORY:
        # Published into the embedded store: address it as the service is reached now,
        # which may be another port than when it was published.
        return f"{settings.image_registry}/{ref.repository}:{ref.tag}"
    return published


def build_base(settings: Settings, inputs: BuildInputs) -> str:
    """The build's FROM: the manifest's baseImage, else the default of its runtime and enableGpu."""
    return inputs.base_image or default_base(settings, inputs.published_base, inputs.runtime, gpu=inputs.gpu)


def unpublished_base(settings: Settings, inputs: BuildInputs, failure: BuildFailed) -> BuildFailed:
    """``failure``, saying how to publish a base image when the default one it could not pull
    was never published."""
    spark = inputs.runtime == "spark-py"
    guessed = not inputs.base_image and not inputs.published_base and not (settings.default_base_image and not spark)
    if failure.step != "pull-base" or not guessed:
        return failure
    command = "mms base-image publish" + (" --variant spark" if spark else "")
    other = "the manifest's baseImage" if spark else "MMS_DEFAULT_BASE_IMAGE or the manifest's baseImage"
    return BuildFailed(
        "pull-base",
        f"{failure.message}: no base image is published yet; publish "
        f"one with `{command}` (or name one with {other}), then create the image again",
    )


_PACKAGE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\.(whl|tar\.gz|zip)")


def package_files(
    context: ServiceContext, inputs: BuildInputs, pip: str | None, conda: str | None, work: Path, emit: Log
) -> tuple[str | None, str | None, dict[str, Path]]:
    """Check where the requirements take packages from (StepFailed naming the line), fetch
    the account's own package files they name, and point the lines at those copies (with
    their sha256), so no package is fetched from a URL a tenant chose."""
    store = context.asset_store

    def own(url: str) -> bool:
        key = store.key_of(url)
        return key is not None and key.split("/", 1)[0] == str(inputs.account_id)

    try:
        references = check_requirements(pip or "", "pip requirements", own_url=own)
        if conda is not None:
            check_conda_channels(conda, context.settings.conda_channels)
            references += check_requirements("\n".join(split_conda(conda)[2]), "conda file pip:", own_url=own)
    except (InvalidBuildSpec, PackageSourceRefused) as exc:  # split_conda: not a conda file
        raise StepFailed("environment", str(exc)) from None
    files: dict[str, Path] = {}
    policy = fetch_policy(context.settings)
    for reference in references:
        name = _file_name(reference.url, "")
        if not _PACKAGE_FILE.fullmatch(name):
            raise StepFailed(
                "environment",
                f"requirement {reference.name} @ …: {name!r} is not a "
                "wheel (.whl) or a source distribution (.tar.gz, .zip)",
            )
        path = work / "requirement-files" / name
        if name in files:
            continue  # named twice (pip and conda): one copy
        path.parent.mkdir(parents=True, exist_ok=True)
        emit(f"mms: fetching {name} for requirement {reference.name}")
        try:
            fetched = fetch(reference.url, path, policy=policy)
        except FetchError as exc:
            reason = fetch_failure(context.settings, reference.url, exc)
            raise StepFailed("fetch", f"requirement {reference.name}: {reason}") from None
        files[name] = path
        local = f"file://{REQUIREMENT_FILES}/{name}#sha256={fetched.sha256}"
        pip = pip.replace(reference.url, local) if pip else pip
        conda = conda.replace(reference.url, local) if conda else conda
    return pip, conda, files


def run_pipeline(context: ServiceContext, image_id: uuid.UUID, emit: Log) -> BuildResult:
    """Build and push one image; StepFailed (or BuildFailed) names the step that failed."""
    settings = context.settings
    inputs = load_inputs(context, image_id)
    builder = make_builder(settings, inputs.builder, context=context)
    if isinstance(builder, OciBuilder):
        check_extra_steps(inputs.extra_steps or "")  # a RUN step fails now, before any fetch
    base = build_base(settings, inputs)  # now: a gpu build with no gpu base fails before any fetch
    with scratch_dir("work") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        app_dir, model_dir, conda, pip = fetch_step(context, inputs, work, emit)
        pip, conda, requirement_files = package_files(context, inputs, pip, conda, work, emit)
        emit(f"mms: inputs fetched in {time.monotonic() - started:.2f} s")
        foreign = foreign_base_image(base, registry=settings.image_registry, account_id=inputs.account_id)
        if foreign:  # the API refuses it too; a manifest stored before that rule is held here
            raise StepFailed("pull-base", foreign)
        spec = BuildSpec(
            base_image=base,
            driver_program=driver_file(inputs),
            app_dir=app_dir,
            runtime=inputs.runtime,
            model_dir=model_dir if model_dir.exists() else None,
            base_registry=inputs.base_registry,
            pip_requirements=pip,
            conda_file=conda,
            extra_dockerfile_steps=inputs.extra_steps,
            labels=inputs.labels,
            ca_bundles=(settings.extra_ca_bundle,) if settings.extra_ca_bundle else (),
            requirement_files=requirement_files,
        )
        emit(f"mms: building with the {inputs.builder} builder")
        started = time.monotonic()
        try:
            result = builder.build_and_push(spec, image_repository(inputs), str(inputs.image_version), emit)
            emit(f"mms: built and pushed in {time.monotonic() - started:.2f} s")
        except InvalidBuildSpec as exc:
            raise StepFailed("environment", str(exc)) from None
        except BuildFailed as exc:
            raise unpublished_base(settings, inputs, exc) from None
    # The oci builder's image, and on the embedded default any image, is pulled from the store:
    # what is started is what the store serves.
    pulled = isinstance(builder, OciBuilder) or settings.is_embedded_registry
    return smoke_step(context, inputs, result, pull=pulled, emit=emit)


def smoke_engine(settings: Settings) -> tuple[str | None, str | None]:
    """The Docker engine a smoke test runs on and, when there is none, why: DOCKER_HOST, else
    an engine on the default socket (the embedded default on a machine that has one)."""
    if settings.smoke_test == "off":
        return None, "turned off on this service (MMS_SMOKE_TEST=off)"
    return local_engine(settings)


def local_engine(settings: Settings) -> tuple[str | None, str | None]:
    """DOCKER_HOST, else an engine answering on the default socket; (None, why) when neither."""
    if settings.docker_host:
        return settings.docker_host, None
    if not Path(DEFAULT_DOCKER_SOCKET).is_socket():
        return None, f"no Docker engine: set DOCKER_HOST, or run one at {DEFAULT_DOCKER_SOCKET}"
    try:
        # Connected first by hand: docker-py leaks the socket of a refused connection.
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(5)
            probe.connect(DEFAULT_DOCKER_SOCKET)
        # A fixed API version: "auto" would ask the engine in the constructor, unguarded.
        with docker.APIClient(base_url=f"unix://{DEFAULT_DOCKER_SOCKET}", version="1.41", timeout=5) as api:
            api.ping()
    except (OSError, docker.errors.DockerException, requests.RequestException) as exc:
        return None, f"the Docker engine at {DEFAULT_DOCKER_SOCKET} did not answer ({type(exc).__name__})"
    return f"unix://{DEFAULT_DOCKER_SOCKET}", None


def smoke_step(
    context: ServiceContext, inputs: BuildInputs, result: BuildResult, *, pull: bool, emit: Log
) -> BuildResult:
    """Start the built image once (its init() and GET /) where an engine is reachable; the
    result says whether it ran, and why not when it could not."""
    settings = context.settings
    engine, missing = smoke_engine(settings)  # the docker builder's engine is DOCKER_HOST
    if engine is None and settings.smoke_test == "required":
        raise StepFailed("smoke test", f"{missing}; this service requires one (MMS_SMOKE_TEST=required)")
    if engine is None:
        emit(f"mms: smoke test skipped: {missing}")
        return replace(result, smoke_test=SmokeTestResult.SKIPPED, smoke_test_reason=missing)
    if pull and settings.is_embedded_registry:
        # The engine pulls from the service's own /v2/ with a token for this image only.
        token = engine_pull_token(context, image_repository(inputs), ttl_seconds=ENGINE_PULL_TOKEN_SECONDS)
        pull_auth = {"registrytoken": token}
    else:
        pull_auth = registry_login(settings)
    emit("mms: smoke test: starting the image once and waiting for GET / to answer")
    try:
        smoke_test(
            engine,
            result.image_location,
            emit,
            timeout=settings.smoke_test_timeout_seconds,
            pull=pull,
            pull_auth=pull_auth,
            memory_mb=settings.smoke_test_memory_mb,
            pids=settings.smoke_test_pids,
            cpus=settings.smoke_test_cpus,
            disk_mb=settings.smoke_test_disk_mb,
        )
    except SmokeTestFailed as exc:
        for line in exc.logs.splitlines():
            emit(f"container: {line}")
        last = [line for line in exc.logs.splitlines() if line.strip()]
        reason = f"{exc.message}: {last[-1].strip()}" if last else exc.message
        raise StepFailed("smoke test", reason) from None
    return replace(result, smoke_test=SmokeTestResult.PASSED)


__all__ = ["BuildFailed", "StepFailed", "run_pipeline"]
