"""Build scoring images without a daemon: layers written as files, pushed over the OCI API.

The base image is never pulled whole: its manifest and config are read, its layers are
mounted (same registry) or copied blob by blob (another registry) into the target
repository, and five new layers go on top, slowest-changing first:

0. the image's user (``workers.oci.accounts``): its line in the base's /etc/passwd and
   /etc/group, its home, a sticky /tmp; the config runs the image as that user, never root;
1. Python dependencies (the manifest's requirements and the scoring server's), installed as
   wheels for the base image's own Python and platform; cached in the registry under a key
   of (requirements, Python version, platform), so an unchanged environment never runs the
   installer again, on any worker;
2. the scoring server;
3. the driver program and assets;
4. the model files.

Every layer is reproducible and the image's own name and version are only its tag, so the
same inputs give the same digest: a new model version uploads one layer, a config and a
manifest. A conda file's conda packages are solved and installed without a container, by
py-rattler (``workers.oci.conda_env``), into /opt/mms/conda: one more layer, below the Python
dependencies; when they bring their own ``python``, the image runs that interpreter. ``RUN``
steps in ``extraDockerfileSteps`` need a container run: buildah runs them, contained, on the
image made so far (``workers.builders.buildah_steps``), and what they wrote is one more layer,
after the model files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import certifi

from app.image_store.oci_layout import OciLayout
from app.package_sources import PackageSourceRefused, canonical_requirement
from workers.build_context import (
    APP_ROOT,
    FIXED_MTIME,
    MODEL_ROOT,
    NO_JAVA,
    PORT,
    RUN_GID,
    RUN_UID,
    RUN_USER,
    SERVER_REQUIREMENTS,
    BuildSpec,
    InvalidBuildSpec,
    check_spec,
    has_models,
    parse_extra_steps,
    read_pem,
    runtime_env,
    runtime_requirements,
    server_dir,
    split_conda,
    start_script,
)
from workers.builders import BuildFailed, BuildResult, Log, address_host, redacting, scrub
from workers.builders.buildah_steps import buildah_missing, run_steps
from workers.builders.run_limits import RunLimits
from workers.builders.step_network import proxy_address
from workers.fetch_policy import allowing_registry
from workers.fetcher import FetchPolicy
from workers.oci.accounts import ACCOUNT_FILES, BaseFile, account_layer, read_base_files
from workers.oci.conda_env import PREFIX as CONDA_PREFIX
from workers.oci.conda_env import CondaEnv, conda_specs, install_conda_env, subdir_for
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.layers import LayerBuilder
from workers.oci.media import LAYER_COMPRESSION, OCI, OCI_LAYER, OCI_LAYER_TAR, OCI_LAYER_ZSTD, Family
from workers.oci.python_env import (
    DEFAULT_INDEX_URL,
    DEFAULT_PATH,
    MIN_PYTHON,
    SITE_PACKAGES,
    UNREADABLE_LAYER,
    TargetPython,
    build_source_wheels,
    dependency_cache_key,
    detect_java,
    detect_target,
    install_dependencies,
    localise_requirements,
    normalise_requirements,
    tar_reader,
)
from workers.oci.remote_registry import (
    ImageReference,
    Manifest,
    RemoteRegistryClient,
    RemoteRegistryError,
    file_chunks,
)
from workers.sandbox import Limits
from workers.scratch import scratch_dir

__all__ = ["BASE_DIGEST_LABEL", "CACHE_REPOSITORY", "OciBuilder", "Store", "check_extra_steps", "put_image"]

logger = logging.getLogger(__name__)

BASE_DIGEST_LABEL = "org.mms.base-image.digest"
CACHE_REPOSITORY = "mms/cache/python-deps"  # under the registry's prefix
SERVICE_NAMESPACE = "mms/"
LIB = "/opt/mms/lib"
CREATED = datetime.fromtimestamp(FIXED_MTIME, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
MODEL_LAYER_LEVEL = 1  # models barely compress; level 1 keeps a warm rebuild near upload speed
CONDA_LAYER_LEVEL = 1  # conda packages were compressed once already; level 1 keeps a large prefix quick


# Where images go: a registry, or the service's own layout (the embedded default).
Store = RemoteRegistryClient | ImageStoreClient


@dataclass(frozen=True)
class _Blob:
    """A layer to place in the target repository, and where it can come from."""

    digest: str
    size: int
    media_type: str
    body: Callable[[], Iterator[bytes]]
    mount_from: str | None = None  # a repository in the target registry that holds it
    diff_id: str = ""  # a new layer's: the digest of its tar
    created_by: str = ""  # a new layer's line in the history
    placed: str | None = None  # already in the target repository (how it got there)


class OciBuilder:
    """Builds on ``registry`` (``host[:port][/prefix]``) with its login, no Docker needed."""

    def __init__(
        self,
        registry: str,
        registry_auth: Mapping[str, str] | None = None,
        *,
        cache_dir: Path | None = None,
        timeout: float = 300.0,
        layout: OciLayout | None = None,
        policy: FetchPolicy | None = None,
        index_url: str = DEFAULT_INDEX_URL,
        sandbox: Limits = Limits(),
        registry_retry_seconds: float | None = None,
        conda_channels: list[str] | None = None,
        run_limits: RunLimits | None = None,
        conda_environments_kept: int = 4,
        build_proxy: str | None = None,
    ) -> None:
        self.registry = registry.rstrip("/")
        self.host, _, self.prefix = self.registry.partition("/")
        self._auth = dict(registry_auth) if registry_auth else None
        self.cache_dir = Path(cache_dir) if cache_dir else None  # uv's wheel cache, base facts
        self._cache_scope = "unscoped"  # the account of the build under way (build_and_push)
        self.timeout = timeout
        # The embedded store: images go into this layout, which the service serves as
        # ``registry`` (its own address); no registry process is involved.
        self.layout = layout
        self.index_url = index_url  # the operator's package index: tenants cannot change it
        self.sandbox = sandbox  # limits of a contained sdist build
        # How long a call to the build's own registry is retried while it is unreachable or
        # failing (a restart, a failover; None: the client's few tries); the build's run
        # deadline bounds the whole build.
        self.registry_retry_seconds = registry_retry_seconds
        # The channels a conda file may name and where they are read (MMS_CONDA_CHANNELS).
        self.conda_channels = list(conda_channels) if conda_channels is not None else ["conda-forge"]
        # Installed conda environments kept in cache_dir for a rebuild of the same packages.
        self.conda_environments_kept = conda_environments_kept if cache_dir else 0
        self.run_limits = run_limits or RunLimits()  # RUN steps' memory, processes, disk, time
        # The egress proxy RUN steps reach the package indexes through (MMS_BUILD_PROXY, as
        # the worker reaches it), and nothing else; None: RUN steps have no network.
        if build_proxy:
            proxy_address(build_proxy)  # ValueError when it is not http://host:port
        self.build_proxy = build_proxy or None
        # What a base image's registry may be (its own registry always): every request for
        # a base goes through it. None: no address rules (a caller that picks the bases).
        self.policy = allowing_registry(policy, self.registry) if policy is not None else None

    def repository(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def build_and_push(self, spec: BuildSpec, image_repo: str, tag: str, log: Log) -> BuildResult:
        """Build ``spec``, push it as ``<registry>/<image_repo>:<tag>``, return the result."""
        secrets = [
            s
            for s in (spec.base_registry and spec.base_registry.password, self._auth and self._auth.get("password"))
            if s
        ]
        emit = redacting(log, secrets)
        started = time.monotonic()
        location = f"{self.registry}/{image_repo}:{tag}"
        self._cache_scope = hashlib.sha256(image_repo.rsplit("/", 1)[0].encode()).hexdigest()[:16]
        try:
            result = self._build(spec, self.repository(image_repo), tag, location, emit)
        except BuildFailed as exc:
            message = scrub(exc.message, secrets)
            emit(f"mms: build failed at step {exc.step}: {message}")
            logger.warning("build.failed", extra={"image": location, "step": exc.step})
            raise BuildFailed(exc.step, message) from None
        elapsed = time.monotonic() - started
        emit(f"mms: done in {elapsed:.1f} s: {location} {result.digest} ({result.size_bytes} bytes compressed)")
        logger.info("build.succeeded", extra={"image": location, "digest": result.digest, "seconds": round(elapsed, 1)})
        return result

    def _build(self, spec: BuildSpec, repo: str, tag: str, location: str, emit: Log) -> BuildResult:
        check_spec(spec)
        config_changes = check_extra_steps(spec.extra_dockerfile_steps or "")
        steps = parse_extra_steps(spec.extra_dockerfile_steps or "")
        runs = [s for s in steps if s.keyword == "RUN"]
        missing = buildah_missing() if runs else None
        if missing:  # at once, before anything is pulled or built
            raise BuildFailed(
                "extra-steps",
                f"extraDockerfileSteps has a RUN step ({runs[0].summary()}), and the oci builder runs RUN "
                f"steps with buildah, but this worker has no {missing}: install them (apt-get install "
                "buildah runc; scripts/bootstrap and the worker image do), or use the docker builder "
                "(builder: docker)",
            )
        requirements = _requirements(spec)
        base_ref = _parse_base(spec.base_image)
        with ExitStack() as stack:
            work = Path(stack.enter_context(scratch_dir("oci")))
            target = stack.enter_context(self._target(emit))
            models = None
            if has_models(spec):
                # The model layer depends on nothing else: it hashes, compresses and uploads
                # while the base image and the environment are read.
                pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="model-layer"))
                models = pool.submit(
                    self._new_layer,
                    _tree(spec.model_dir, MODEL_ROOT),
                    "mms oci builder: model files",
                    target,
                    repo,
                    emit,
                    level=MODEL_LAYER_LEVEL,
                )
            source = target
            if not self._is_service_base(spec, base_ref):
                source = stack.enter_context(
                    self._client(base_ref.host, self._base_login(spec, base_ref), policy=self.policy)
                )

            step = "pull-base"
            try:
                emit(f"mms: reading base image {base_ref}")
                base = source.get_manifest(base_ref.repository, base_ref.reference)
                family = Family.of(base.media_type)
                base_config = json.loads(source.get_blob(base_ref.repository, base.body["config"]["digest"]))
                emit(f"mms: base {base.digest}: {len(base.body['layers'])} layer(s), {family.manifest.split('/')[-1]}")
                _check_layer_types(base)
                _check_no_volumes(base_config)
                python = self._target_python(base, base_config, source, base_ref, emit)
                if spec.runtime == "spark-py":
                    self._check_java(base, base_config, source, base_ref, emit)

                # Each new layer is uploaded while it compresses, unless this worker made the
                # same one before (known by its tar's digest): then the registry has it.
                step = "user"
                user = self._new_layer(
                    self._account_layer(base, base_config, source, base_ref, emit),
                    "mms oci builder: the image's user",
                    target,
                    repo,
                    emit,
                )
                step = "environment"
                conda = self._conda_env(spec, python, base_config, work, emit)
                extra: list[_Blob] = []
                if conda is not None:
                    extra.append(
                        self._new_layer(conda.layer, _conda_history(conda), target, repo, emit, level=CONDA_LAYER_LEVEL)
                    )
                    if conda.interpreter:
                        # The scoring server and the pip entries are installed for its Python.
                        version = ".".join(conda.python.split(".")[:2])  # type: ignore[union-attr]
                        python = replace(python, version=version, executable=conda.interpreter)
                        emit(f"mms: the image runs the conda environment's Python {conda.python}")
                deps = self._dependency_layer(requirements, python, spec, target, family, work, emit)
                step = "scoring-server"
                server = _server_layer(python.executable)
                layers = [self._new_layer(server, "mms oci builder: scoring server", target, repo, emit)]
                step = "driver"
                layers.append(
                    self._new_layer(
                        _tree(spec.app_dir, APP_ROOT), "mms oci builder: driver program and assets", target, repo, emit
                    )
                )
                if models is not None:
                    step = "models"
                    layers.append(models.result())
                # New layers take the base image's media types (Docker v2 or OCI).
                user = replace(user, media_type=family.layer)
                extra = [replace(layer, media_type=family.layer) for layer in extra]
                layers = [replace(layer, media_type=family.layer) for layer in layers]

                step = "push"
                blobs = [
                    _Blob(
                        d["digest"],
                        d["size"],
                        d["mediaType"],
                        self._base_blob_body(source, base_ref, d["digest"], work),
                        base_ref.repository if source is target else None,
                    )
                    for d in base.body["layers"]
                ]
                new = [user, *extra, deps, *layers]
                blobs += new
                diff_ids = [blob.diff_id for blob in new]
                history = [blob.created_by for blob in new]
                env = runtime_env(spec, f"{LIB}:{SITE_PACKAGES}") | {"MMS_SITE_PACKAGES": SITE_PACKAGES}
                if conda is not None:
                    env |= _conda_env_vars(base_config)
                labels = {**spec.labels, BASE_DIGEST_LABEL: base.digest}
                if runs:
                    # The extra steps run last, on the image made so far, as the docker builder
                    # runs them after the model files: their writes are one more layer.
                    step = "extra-steps"
                    blobs.append(
                        self._run_steps(
                            target,
                            repo,
                            family,
                            blobs,
                            base_config,
                            diff_ids,
                            history,
                            env,
                            steps,
                            work,
                            emit,
                            ca_bundle=self._ca_bundle(spec, work),
                        )
                    )
                    diff_ids.append(blobs[-1].diff_id)
                    history.append(blobs[-1].created_by)
                config = _image_config(base_config, diff_ids, history, env=env, labels=labels, changes=config_changes)
                digest, size = self._push(target, repo, tag, family, blobs, config, emit)
            except RemoteRegistryError as exc:
                raise BuildFailed(step, str(exc)) from None
            except InvalidBuildSpec as exc:
                raise BuildFailed(step, str(exc)) from None
        return BuildResult(location, digest, size, base.digest)

    # -- inputs ------------------------------------------------------------------------

    def _target(self, emit: Log) -> Store:
        if self.layout is not None:
            return ImageStoreClient(self.layout, self.host)
        login = self._auth or {}
        budget: dict[str, Any] = {}  # None: the client's own few tries
        if self.registry_retry_seconds is not None:
            # Backoff tops out at 10 s a wait: enough tries that the time budget ends them.
            budget = {"retry_seconds": self.registry_retry_seconds, "tries": 4 + int(self.registry_retry_seconds // 5)}
        return RemoteRegistryClient(
            self.host,
            login.get("username"),
            login.get("password"),
            timeout=self.timeout,
            on_retry=lambda text: emit(f"mms: {text}"),
            **budget,
        )

    def _client(
        self, host: str, login: Mapping[str, str] | None, *, policy: FetchPolicy | None = None
    ) -> RemoteRegistryClient:
        login = login or {}
        return RemoteRegistryClient(
            host, login.get("username"), login.get("password"), timeout=self.timeout, policy=policy
        )

    def _is_service_base(self, spec: BuildSpec, ref: ImageReference) -> bool:
        # The service's login reads (and mounts from) only its own prebuilt bases: other
        # tenants' images live in the same registry, and a manifest's baseImage must not
        # reach them through it. Any other base is read with the manifest's own login.
        return (
            spec.base_registry is None
            and address_host(ref.host) == self.host
            and ref.repository.startswith(self.repository(SERVICE_NAMESPACE))
        )

    def _base_login(self, spec: BuildSpec, ref: ImageReference) -> dict[str, str] | None:
        creds = spec.base_registry
        if creds is None:
            return None
        given = address_host(creds.address)
        if given != address_host(ref.host):
            raise BuildFailed(
                "pull-base",
                f"the base image registry credentials are for "
                f"{given}, but the base image is on {address_host(ref.host)}",
            )
        return {"username": creds.username, "password": creds.password}

    def _target_python(
        self, base: Manifest, config: dict, source: Store, ref: ImageReference, emit: Log
    ) -> TargetPython:
        # targets-v2: the platform is one uv accepts and the interpreter's path is kept.
        cached = self._base_facts_path("targets", base)
        known = _read_json(cached) if cached is not None else None
        if known is not None:
            return TargetPython(**known)

        def openers() -> Iterator[Any]:
            emit("mms: reading the base image's layers to find its Python and C library")
            for layer in base.body["layers"]:
                yield _base_layer(source, ref, layer)

        python = detect_target(config, openers, base=f"base image {ref}")
        emit(f"mms: base image runs {python.describe()} ({python.executable})")
        if cached is not None:
            _write_json(cached, asdict(python))
        return python

    def _account_layer(
        self, base: Manifest, config: dict, source: Store, ref: ImageReference, emit: Log
    ) -> LayerBuilder:
        """The image's user, added to the base's /etc/passwd and /etc/group (read once per
        base and worker: the files are cached by the base config's digest)."""
        cached = self._base_facts_path("accounts", base)
        known = _read_json(cached) if cached is not None else None
        if known is not None:
            files = {k: BaseFile(None if v is None else v.encode("latin-1")) for k, v in known.items()}
        else:

            def openers() -> Iterator[Any]:
                emit("mms: reading the base image's layers for its /etc/passwd and /etc/group")
                for layer in base.body["layers"]:
                    yield _base_layer(source, ref, layer)

            files = read_base_files(openers, ACCOUNT_FILES)
            if cached is not None:
                _write_json(cached, {k: None if v.data is None else v.data.decode("latin-1") for k, v in files.items()})
        builder, named = account_layer(files)
        if not named:
            emit(
                f"mms: the base image's /etc/passwd is not a plain file: the image runs as uid "
                f"{RUN_UID} without the name {RUN_USER!r}"
            )
        return builder

    def _check_java(self, base: Manifest, config: dict, source: Store, ref: ImageReference, emit: Log) -> None:
        """SparkPython needs a JVM in the base: its label says, else its layers (cached)."""
        cached = self._base_facts_path("java", base)
        known = _read_json(cached) if cached is not None else None
        if known is not None:
            java = known["java"]
        else:

            def openers() -> Iterator[Any]:
                emit("mms: reading the base image's layers to find its Java runtime")
                for layer in base.body["layers"]:
                    yield _base_layer(source, ref, layer)

            java = detect_java(config, openers)
            if cached is not None:
                _write_json(cached, {"java": java})
        if java is None:
            raise BuildFailed("environment", NO_JAVA)
        emit(f"mms: base image has Java ({java}) for the SparkPython runtime")

    def _base_blob_body(
        self, source: Store, ref: ImageReference, digest: str, work: Path
    ) -> Callable[[], Iterator[bytes]]:
        def body() -> Iterator[bytes]:
            # Copied through a file: the digest is checked before a byte is uploaded.
            path = work / f"base-{digest[7:]}"
            if not path.exists():
                source.download_blob(ref.repository, digest, path)
            yield from file_chunks(path)()

        return body

    # -- layers ------------------------------------------------------------------------

    def _conda_env(self, spec: BuildSpec, python: TargetPython, config: dict, work: Path, emit: Log) -> CondaEnv | None:
        """The conda file's conda packages installed (None when the base's Python and pip
        serve the whole file)."""
        if spec.conda_file is None:
            return None
        specs = conda_specs(spec.conda_file, python.version)
        if not specs:
            return None
        env = install_conda_env(
            spec.conda_file,
            specs,
            channels=self.conda_channels,
            subdir=subdir_for(config.get("architecture") or "amd64"),
            glibc=python.libc.removeprefix("glibc-") if python.libc.startswith("glibc-") else "",
            work=work,
            cache_dir=(self.cache_dir or work) / "conda",
            emit=emit,
            policy=self.policy,
            timeout=max(self.timeout, 1800),
            limits=self.sandbox,
            environments_kept=self.conda_environments_kept,
        )
        if env.python is not None and tuple(int(p) for p in env.python.split(".")[:2]) < MIN_PYTHON:
            raise BuildFailed(
                "environment",
                f"the conda file's python resolves to {env.python}, older than the scoring server runs on "
                f"({'.'.join(map(str, MIN_PYTHON))} or newer): ask for python>={'.'.join(map(str, MIN_PYTHON))}",
            )
        return env

    def _dependency_layer(
        self,
        requirements: list[str],
        python: TargetPython,
        spec: BuildSpec,
        target: Store,
        family: Family,
        work: Path,
        emit: Log,
    ) -> _Blob:
        key = dependency_cache_key(requirements, python, self.index_url)
        cache_repo = self.repository(CACHE_REPOSITORY)
        entry = target.find_manifest(cache_repo, key)
        if entry is not None:
            layer = entry.body["layers"][0]
            cache_config = json.loads(target.get_blob(cache_repo, entry.body["config"]["digest"]))
            emit(f"mms: dependency layer cached ({key[:12]}): {layer['size']} bytes, no install needed")
            return _Blob(
                layer["digest"],
                layer["size"],
                family.layer,
                _no_body,
                cache_repo,
                cache_config["rootfs"]["diff_ids"][0],
                _deps_history(key),
            )
        started = time.monotonic()
        site = work / "deps" / "site-packages"
        ca_bundle = self._ca_bundle(spec, work)
        wheelhouse = work / "wheels"  # this build's own: no other build's wheel is offered
        requirements = localise_requirements(
            requirements,
            spec.requirement_files,
            wheelhouse,
            emit,
            cache=(self.cache_dir or work) / "source-wheels",
            limits=self.sandbox,
        )
        build_source_wheels(
            requirements,
            wheelhouse,
            emit,
            cache=(self.cache_dir or work) / "source-wheels",
            index_url=self.index_url,
            ca_bundle=ca_bundle,
            limits=self.sandbox,
        )
        install_dependencies(
            requirements,
            python,
            site,
            emit,
            cache_dir=self.cache_dir / "uv" if self.cache_dir else None,
            ca_bundle=ca_bundle,
            timeout=max(self.timeout, 1800),
            wheelhouse=wheelhouse,
            index_url=self.index_url,
        )
        builder = LayerBuilder()
        builder.add_tree(site, SITE_PACKAGES)
        layer = builder.write(work / "deps.tar.gz", _deps_history(key))
        emit(
            f"mms: dependency layer {layer.size} bytes in {time.monotonic() - started:.1f} s; caching it as {key[:12]}"
        )
        target.push_blob(cache_repo, layer.digest, layer.size, file_chunks(layer.path))
        cache_config = _json(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
                "config": {"Labels": {"org.mms.cache.python": python.describe()}},
            }
        )
        put_image(
            target,
            cache_repo,
            key,
            OCI,
            cache_config,
            [{"mediaType": OCI.layer, "digest": layer.digest, "size": layer.size}],
        )
        return _Blob(
            layer.digest, layer.size, family.layer, file_chunks(layer.path), cache_repo, layer.diff_id, layer.created_by
        )

    @staticmethod
    def _ca_bundle(spec: BuildSpec, work: Path) -> Path | None:
        if not spec.ca_bundles:
            return None
        # uv's SSL_CERT_FILE replaces its roots: keep the public ones and add the extra CAs.
        bundle = work / "ca-bundle.pem"
        bundle.write_bytes(Path(certifi.where()).read_bytes() + b"\n" + b"".join(read_pem(p) for p in spec.ca_bundles))
        return bundle

    def _new_layer(
        self, builder: LayerBuilder, created_by: str, target: Store, repo: str, emit: Log, *, level: int = 6
    ) -> _Blob:
        """Put a new layer in ``repo``: streamed up while it compresses, or, when this worker
        made the same tar before, named by its recorded digest and pushed (HEAD, mount, or
        compressed again) with the other blobs."""
        started = time.monotonic()
        diff_id = builder.diff_id()
        cache = self._layer_cache_path(diff_id, level)
        entry = _read_json(cache) if cache else None
        if entry is not None:
            return _Blob(
                entry["digest"],
                entry["size"],
                "",
                lambda: iter(builder.stream(created_by, level=level)),
                entry["repository"],
                diff_id,
                created_by,
            )
        # A streamed upload cannot be replayed: after a transient failure the layer is
        # compressed and sent again from its beginning, under the registry's retry budget.
        for attempt in target.retries():
            with attempt:
                stream = builder.stream(created_by, level=level)
                digest, size = target.upload_stream(repo, stream)
        if stream.layer.diff_id != diff_id:
            raise BuildFailed("push", f"{created_by}: the files changed while the layer was made")
        emit(
            f"mms: uploaded {created_by.split(': ', 1)[-1]} {digest[:19]} ({size} bytes) "
            f"in {time.monotonic() - started:.2f} s"
        )
        if cache is not None:
            _write_json(cache, {"digest": digest, "size": size, "repository": repo})
        return _Blob(digest, size, "", _no_body, None, diff_id, created_by, placed="uploaded")

    def _base_facts_path(self, kind: str, base: Manifest) -> Path | None:
        """Where facts read from a base's layers (its Python, its users, its Java) are cached:
        per account, and by every layer's digest. The layers are read as they stream, before
        their digests can be checked, so a base of one account's (a public config with layers
        of its own) must never answer for another account's build."""
        if self.cache_dir is None:
            return None
        digests = [base.body["config"]["digest"], *(layer["digest"] for layer in base.body["layers"])]
        key = hashlib.sha256(" ".join(digests).encode()).hexdigest()
        return self.cache_dir / "base-facts" / self._cache_scope / kind / f"{key}.json"

    def _layer_cache_path(self, diff_id: str, level: int) -> Path | None:
        # The blob's bytes follow from the tar, the level and zlib's release: all in the key.
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{diff_id} {level} {zlib.ZLIB_RUNTIME_VERSION} {self.registry}".encode()).hexdigest()
        return self.cache_dir / "layers" / f"{key}.json"

    # -- RUN steps -----------------------------------------------------------------------

    def _run_steps(
        self,
        target: Store,
        repo: str,
        family: Family,
        blobs: list[_Blob],
        base_config: dict,
        diff_ids: list[str],
        history: list[str],
        env: dict[str, str],
        steps: list[Any],
        work: Path,
        emit: Log,
        *,
        ca_bundle: Path | None,
    ) -> _Blob:
        """Run the extra steps with buildah on the image made so far; return the layer they
        wrote, uploaded to ``repo``."""
        started = time.monotonic()
        layout = work / "steps-image"
        (layout / "blobs" / "sha256").mkdir(parents=True)
        # Every layer is put in the target first, then read back from it: one way for base,
        # cached and new layers alike (the store checks each digest).
        for blob in blobs:
            how = blob.placed or target.push_blob(repo, blob.digest, blob.size, blob.body, mount_from=blob.mount_from)
            copy = layout / "blobs" / "sha256" / blob.digest[7:]
            if self.layout is not None:
                # The service's own store links a new or mounted blob to the repository only
                # with its manifest; its files are by digest, checked when they were written.
                shutil.copyfile(self.layout.blob_path(blob.digest), copy)
            else:
                target.download_blob(blob.mount_from if how == "mounted" else repo, blob.digest, copy)
        # The steps see the image's environment (their own ENV and ARG come in order), as root.
        config = _image_config(
            base_config, diff_ids, history, env=env, labels={}, changes={"env": {}, "labels": {}, "ports": []}
        )
        manifest = _json(
            {
                "schemaVersion": 2,
                "mediaType": OCI.manifest,
                "config": {"mediaType": OCI.config, "digest": _sha(config), "size": len(config)},
                "layers": [
                    {"mediaType": _OCI_LAYER_TYPE[LAYER_COMPRESSION[b.media_type]], "digest": b.digest, "size": b.size}
                    for b in blobs
                ],
            }
        )
        for data in (config, manifest):
            (layout / "blobs" / "sha256" / _sha(data)[7:]).write_bytes(data)
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": OCI.manifest,
                    "digest": _sha(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": "image"},
                }
            ],
        }
        (layout / "index.json").write_text(json.dumps(index))
        emit(f"mms: the image for the RUN steps is ready in {time.monotonic() - started:.1f} s")
        layer = run_steps(
            layout, steps, work=work, limits=self.run_limits, emit=emit, proxy=self.build_proxy, ca_bundle=ca_bundle
        )
        for blob in blobs:  # read by buildah: no longer needed
            (layout / "blobs" / "sha256" / blob.digest[7:]).unlink(missing_ok=True)
        how = target.push_blob(repo, layer.digest, layer.size, file_chunks(layer.path))
        emit(f"mms: the RUN steps' layer {layer.digest[:19]} ({layer.size} bytes) {how}")
        summary = "; ".join(s.summary(60) for s in steps if s.keyword == "RUN")
        return _Blob(
            layer.digest,
            layer.size,
            family.layer,
            _no_body,
            None,
            layer.diff_id,
            f"mms oci builder: extra steps, run by buildah ({summary[:200]})",
            placed="uploaded",
        )

    # -- push --------------------------------------------------------------------------

    def _push(
        self, target: Store, repo: str, tag: str, family: Family, blobs: list[_Blob], config: bytes, emit: Log
    ) -> tuple[str, int]:
        started = time.monotonic()
        counts: dict[str, int] = {}
        uploaded = 0
        for blob in blobs:
            how = blob.placed or target.push_blob(repo, blob.digest, blob.size, blob.body, mount_from=blob.mount_from)
            counts[how] = counts.get(how, 0) + 1
            if how == "uploaded":
                uploaded += blob.size
                if not blob.placed:
                    emit(f"mms: uploaded {blob.digest[:19]} ({blob.size} bytes)")
        digest = put_image(
            target,
            repo,
            tag,
            family,
            config,
            [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in blobs],
        )
        summary = ", ".join(f"{n} {how}" for how, n in sorted(counts.items()))
        emit(
            f"mms: pushed {self.host}/{repo}:{tag} {digest} in "
            f"{time.monotonic() - started:.2f} s (layers: {summary}; {uploaded} bytes uploaded)"
        )
        return digest, sum(b.size for b in blobs)


_OCI_LAYER_TYPE = {"gzip": OCI_LAYER, "zstd": OCI_LAYER_ZSTD, None: OCI_LAYER_TAR}


def put_image(target: Store, repo: str, tag: str, family: Family, config: bytes, layers: list[dict[str, Any]]) -> str:
    """Push the config blob, then the manifest naming it and ``layers``; return its digest."""
    config_digest = _sha(config)
    target.push_blob(repo, config_digest, len(config), lambda: iter([config]))
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": family.manifest,
            "config": {"mediaType": family.config, "digest": config_digest, "size": len(config)},
            "layers": layers,
        }
    )
    return target.put_manifest(repo, tag, manifest, family.manifest)


def _check_layer_types(base: Manifest) -> None:
    for layer in base.body["layers"]:
        if layer.get("mediaType") not in LAYER_COMPRESSION:
            raise BuildFailed(
                "pull-base",
                f"base layer {layer.get('digest', '?')[:19]} has media "
                f"type {layer.get('mediaType')!r}, which the oci builder cannot "
                "read (it reads tar layers: uncompressed, gzip or zstd); use "
                "another base image or the docker builder (builder: docker)",
            )


@contextmanager
def _base_layer(source: Store, ref: ImageReference, layer: dict[str, Any]) -> Iterator[BinaryIO]:
    """A base layer's tar, read as it downloads; bytes that are not what its media type
    says fail the build naming the layer."""
    with source.open_blob(ref.repository, layer["digest"]) as chunks:
        try:
            yield tar_reader(chunks, layer["mediaType"])
        except UNREADABLE_LAYER as exc:
            kind = LAYER_COMPRESSION[layer["mediaType"]] or "uncompressed"
            raise BuildFailed(
                "pull-base",
                f"base layer {layer['digest'][:19]} is not a readable "
                f"{kind} tar as its media type {layer['mediaType']} says: "
                f"{type(exc).__name__}: {exc}",
            ) from None


def _no_body() -> Iterator[bytes]:
    raise RemoteRegistryError("the cached dependency layer vanished from the registry; build again")


def _conda_history(env: CondaEnv) -> str:
    digest = hashlib.sha256(" ".join(env.packages).encode()).hexdigest()
    return f"mms oci builder: conda environment {CONDA_PREFIX} ({len(env.packages)} packages, {digest[:12]})"


def _conda_env_vars(base_config: dict) -> dict[str, str]:
    """The conda environment, activated as far as the image needs: its programs first on
    PATH. Not LD_LIBRARY_PATH: conda's binaries find their libraries by their own RPATH, and
    putting conda's libraries before the base's would change what the base's programs load."""
    base_env = dict(e.split("=", 1) for e in (base_config.get("config") or {}).get("Env") or [] if "=" in e)
    return {"PATH": f"{CONDA_PREFIX}/bin:{base_env.get('PATH') or DEFAULT_PATH}", "CONDA_PREFIX": CONDA_PREFIX}


def _deps_history(key: str) -> str:
    return f"mms oci builder: python dependencies (environment {key[:12]})"


def _tree(root: Path | None, image_path: str) -> LayerBuilder:
    builder = LayerBuilder()
    if root is not None:
        builder.add_tree(root, image_path)
    return builder


def _server_layer(python: str) -> LayerBuilder:
    builder = LayerBuilder()
    builder.add_tree(server_dir(), f"{LIB}/scoring_server")
    # The base's own interpreter, by the path its PATH lookup found (python3 if labels said all).
    builder.add_bytes("/opt/mms/bin/start", start_script(python).encode(), executable=True)
    return builder


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def _parse_base(reference: str) -> ImageReference:
    try:
        return ImageReference.parse(reference)
    except ValueError as exc:
        raise BuildFailed("pull-base", str(exc)) from None


def _requirements(spec: BuildSpec) -> list[str]:
    """The scoring server's pins and the manifest's pip entries, or BuildFailed."""
    lines = [*SERVER_REQUIREMENTS, *runtime_requirements(spec)]
    if spec.conda_file is not None:
        try:
            lines += split_conda(spec.conda_file)[2]
        except InvalidBuildSpec as exc:
            raise BuildFailed("environment", str(exc)) from None
    if spec.pip_requirements:
        lines += spec.pip_requirements.splitlines()
    kept = []
    for line in normalise_requirements(lines):
        # The installer reads only what the service writes: the parsed requirement and its
        # hashes, never an option a tenant put after it (an index, find-links).
        try:
            kept.append(canonical_requirement(line))
        except PackageSourceRefused:
            raise BuildFailed(
                "environment",
                f"requirement line {_shown(line)!r} is not a "
                "requirement such as name==1.0: package sources are the "
                "operator's (MMS_PIP_INDEX_URL)",
            ) from None
    return kept


def _shown(line: str) -> str:
    text = line.split("?", 1)[0]
    return text if len(text) <= 80 else text[:79] + "…"


def check_extra_steps(text: str) -> dict[str, Any]:
    """ENV, LABEL and EXPOSE steps become config (RUN steps are run by buildah)."""
    changes: dict[str, Any] = {"env": {}, "labels": {}, "ports": []}
    try:
        steps = parse_extra_steps(text)
    except InvalidBuildSpec as exc:
        raise BuildFailed("extra-steps", str(exc)) from None
    for step in steps:
        if step.keyword == "EXPOSE":
            changes["ports"] += [p if "/" in p else f"{p}/tcp" for p in step.words]
        elif step.keyword in ("ENV", "LABEL"):  # ARG is build-time only: nothing runs here
            changes["env" if step.keyword == "ENV" else "labels"].update(step.pairs)
    return changes


def _check_no_volumes(base_config: dict) -> None:
    """A base's VOLUME would give the smoke test's container (and every deployment's) a volume
    the disk limit does not count: refused, as the docker builder refuses it."""
    volumes = sorted((base_config.get("config") or {}).get("Volumes") or {})
    if volumes:
        shown = ", ".join(volumes)[:200].encode("unicode_escape").decode()
        raise BuildFailed(
            "pull-base",
            f"the base image declares volumes ({shown}), whose writes would escape the "
            "smoke test's disk limit: build on an image without VOLUME",
        )


def _image_config(
    base: dict,
    diff_ids: list[str],
    history: list[str],
    *,
    env: dict[str, str],
    labels: Mapping[str, str],
    changes: dict[str, Any],
) -> bytes:
    config = {
        k: v for k, v in base.items() if k not in ("container", "container_config", "docker_version", "id", "parent")
    }
    config["created"] = CREATED
    run = dict(base.get("config") or {})
    merged_env = dict(e.split("=", 1) for e in run.get("Env") or [] if "=" in e)
    merged_env.update(env)
    merged_env.update(changes["env"])
    run["Env"] = [f"{k}={v}" for k, v in merged_env.items()]
    run["Cmd"] = ["/opt/mms/bin/start"]
    run["WorkingDir"] = APP_ROOT  # root's, read-only: HOME and /tmp are where it writes
    run["User"] = f"{RUN_UID}:{RUN_GID}"  # whatever the base said (extra steps cannot say USER)
    ports = dict(run.get("ExposedPorts") or {})
    for port in [f"{PORT}/tcp", *changes["ports"]]:
        ports[port] = {}
    run["ExposedPorts"] = ports
    run["Labels"] = {**(run.get("Labels") or {}), **labels, **changes["labels"]}
    config["config"] = run
    rootfs = base.get("rootfs") or {"type": "layers", "diff_ids": []}
    config["rootfs"] = {"type": "layers", "diff_ids": [*rootfs.get("diff_ids", []), *diff_ids]}
    config["history"] = [*(base.get("history") or []), *({"created": CREATED, "created_by": line} for line in history)]
    return _json(config)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"
