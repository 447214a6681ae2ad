"""The service image (Dockerfile): it builds on the locally made base image, runs the API as a
non-root user that answers /health, stops on SIGTERM, and runs a build worker.

The build context is the repository filtered by .dockerignore, as `docker build .` sends it,
plus the host's CA bundle in docker/build-ca/ (pip reaches PyPI through a TLS-inspecting
proxy here). The build cache is kept between runs; the image and containers are removed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import socket
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
import yaml
from docker.utils.build import exclude_paths

from tests.infra import TEST_LABEL, Infra

ROOT = Path(__file__).resolve().parents[2]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The base image is ~146 MB of it; py-rattler (the oci builder's conda solver) ships an
# 82 MB shared library, which took the image from ~390 MB to 475 MB.
MAX_IMAGE_BYTES = 500 * 1024**2
SECRET_KEY = secrets.token_urlsafe(48)  # the image runs in production: it needs one


@dataclass
class ServiceImage:
    tag: str
    size: int
    build_seconds: float
    healthcheck: list[str]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def build_context() -> io.BytesIO:
    """The repository as .dockerignore filters it, plus the host's CAs for pip."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(exclude_paths(str(ROOT), _dockerignore())):
            path = ROOT / name
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=name, recursive=False)
        if HOST_CA_BUNDLE.exists():
            tar.add(HOST_CA_BUNDLE, arcname="docker/build-ca/host-ca.crt")
    buffer.seek(0)
    return buffer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def service_image(infra: Infra) -> Iterator[ServiceImage]:
    tag = f"{infra.prefix}/mms-service:test"
    started = time.monotonic()
    log: list[str] = []
    with infra.api() as api:
        for chunk in api.build(
            fileobj=build_context(),
            custom_context=True,
            tag=tag,
            buildargs={"BASE_IMAGE": infra.base_image},
            network_mode="host",
            pull=False,
            rm=True,
            forcerm=True,
            decode=True,
        ):
            log.append(chunk.get("stream", ""))
            if "error" in chunk:
                pytest.fail(f"the image did not build: {chunk['error']}\n{''.join(log)[-4000:]}")
        seconds = time.monotonic() - started
        inspected = api.inspect_image(tag)
    print(f"\nservice image built in {seconds:.1f} s: {inspected['Size'] / 1e6:.0f} MB")
    try:
        yield ServiceImage(tag, inspected["Size"], seconds, inspected["Config"]["Healthcheck"]["Test"])
    finally:
        with infra.api() as api, contextlib.suppress(docker.errors.NotFound):
            for container in api.containers(all=True, filters={"ancestor": tag}):
                api.remove_container(container["Id"], force=True)
            # The tag goes; the layers stay behind, untagged, as the next run's build cache.
            api.remove_image(tag, force=True, noprune=True)


@contextlib.contextmanager
def _container(infra: Infra, image: str, environment: dict[str, str], **options) -> Iterator[str]:
    with infra.api() as api:
        container = api.create_container(
            image,
            environment=environment,
            labels={TEST_LABEL: "packaging"},
            host_config=api.create_host_config(network_mode="host"),
            **options,
        )["Id"]
        api.start(container)
        try:
            yield container
        finally:
            api.remove_container(container, force=True)


def _wait_for(what: str, check, container: str, infra: Infra, timeout: float = 90) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    with infra.api() as api:
        while time.monotonic() < deadline:
            if check():
                return
            if api.inspect_container(container)["State"]["Status"] == "exited":
                break
            time.sleep(0.5)
        logs = api.logs(container).decode(errors="replace")
    pytest.fail(f"{what} did not happen; the container's log:\n{logs[-4000:]}")


def _exec(infra: Infra, container: str, command: list[str]) -> tuple[int, str]:
    with infra.api() as api:
        exec_id = api.exec_create(container, command)["Id"]
        output = api.exec_start(exec_id).decode(errors="replace")
        return api.exec_inspect(exec_id)["ExitCode"], output


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return None


def test_image_is_small_and_configured(service_image: ServiceImage, infra: Infra) -> None:
    with infra.api() as api:
        config = api.inspect_image(service_image.tag)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["tini", "--"]
    assert config["Cmd"] == ["mms", "serve"]
    assert "MMS_ENV=production" in config["Env"]
    assert "8000/tcp" in config["ExposedPorts"]
    assert service_image.size < MAX_IMAGE_BYTES, f"{service_image.size / 1e6:.0f} MB"


def test_api_answers_health_as_a_non_root_user_and_stops_on_sigterm(service_image: ServiceImage, infra: Infra) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # The embedded default: SQLite, the embedded broker and its build worker, local files.
    # The image's own healthcheck command, run every second instead of every 30.
    healthcheck = {"test": service_image.healthcheck, "interval": 1_000_000_000, "timeout": 5_000_000_000, "retries": 3}
    with _container(
        infra,
        service_image.tag,
        {"MMS_HOST": "127.0.0.1", "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text", "MMS_SECRET_KEY": SECRET_KEY},
        healthcheck=healthcheck,
    ) as container:
        _wait_for("/health answering 200", lambda: _get(f"{base}/health") == 200, container, infra)
        assert _get(f"{base}/ready") == 200  # the migrated database and the broker answer

        code, uid = _exec(infra, container, ["id", "-u"])
        assert (code, uid.strip()) == (0, "10001")
        with infra.api() as api:
            processes = api.top(container, ps_args="-o pid,uid,args")["Processes"]
        assert processes and all(row[1] == "10001" for row in processes), processes

        with infra.api() as api:
            _wait_for(
                "the healthcheck reporting healthy",
                lambda: api.inspect_container(container)["State"]["Health"]["Status"] == "healthy",
                container,
                infra,
                timeout=30,
            )
            started = time.monotonic()
            api.stop(container, timeout=25)
            stopped_in = time.monotonic() - started
            state = api.inspect_container(container)["State"]
        # SIGTERM reached the service through tini: it stopped by itself, not by SIGKILL.
        assert stopped_in < 20 and state["ExitCode"] != 137, (stopped_in, state)


def test_the_image_runs_in_production_and_refuses_to_start_without_a_secret_key(
    service_image: ServiceImage, infra: Infra
) -> None:
    with _container(infra, service_image.tag, {"MMS_PORT": str(_free_port())}) as container, infra.api() as api:
        exited = api.wait(container, timeout=60)
        logs = api.logs(container).decode(errors="replace")
    assert exited["StatusCode"] == 1, logs[-2000:]
    assert "MMS_SECRET_KEY" in logs and "MMS_ENV=production" in logs


def _worker_healthcheck() -> str:
    """The worker's healthcheck command from docker-compose.yml, as the shell will see it."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    test = compose["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    return test[1].replace("$$", "$")


def test_the_image_runs_a_build_worker(service_image: ServiceImage, infra: Infra) -> None:
    redis = os.environ.get("MMS_TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
    try:
        with socket.create_connection(re.match(r"redis://([^:/]+):(\d+)", redis).groups(), timeout=2):  # type: ignore[union-attr, arg-type]
            pass
    except OSError:
        pytest.skip(f"needs Redis at {redis} (scripts/test starts it)")
    environment = {
        "MMS_BROKER_URL": redis,
        "MMS_BUILD_QUEUE": f"mms-packaging-{uuid.uuid4().hex[:8]}",
        "MMS_DATABASE_URL": "sqlite:////var/lib/mms/worker.db",
        "MMS_AUTO_MIGRATE": "true",
        "MMS_LOG_FORMAT": "text",
        "MMS_SECRET_KEY": SECRET_KEY,
    }
    with _container(infra, service_image.tag, environment, command=["mms", "worker"]) as container:
        ping = ["sh", "-c", _worker_healthcheck()]
        _wait_for(
            "the worker answering the compose healthcheck's ping",
            lambda: _exec(infra, container, ping)[0] == 0,
            container,
            infra,
        )
        # The oci builder turns sdist-only requirements (pyspark) into wheels with the worker's pip.
        assert _exec(infra, container, ["python", "-m", "pip", "--version"])[0] == 0
        with infra.api() as api:
            started = time.monotonic()
            api.stop(container, timeout=25)
            stopped_in = time.monotonic() - started
            state = api.inspect_container(container)["State"]
        assert stopped_in < 20 and state["ExitCode"] != 137, (stopped_in, state)


# Run as the image's user (10001): contained steps as the oci builder runs a package's build
# backend: one prints its uid, its network interfaces and the processes it sees; one builds a
# wheel of a small sdist with the worker's pip, as for pyspark.
SANDBOX_PROBE = """\
import io, sys, tarfile, tempfile
from pathlib import Path
from workers.sandbox import Limits, SandboxFailed, run_contained

probe = ("import os, socket; print('inside uid', os.getuid(), 'interfaces', "
         "sorted(n for _, n in socket.if_nameindex()), 'processes', "
         "sorted(p for p in os.listdir('/proc') if p.isdigit()) if os.path.isdir('/proc') else 'no /proc')")
sdist = Path(tempfile.mkdtemp()) / "tiny-1.0.tar.gz"
with tarfile.open(sdist, "w:gz") as tar:
    for name, text in {"pyproject.toml": '[build-system]\\nrequires = ["setuptools"]\\n'
                                         'build-backend = "setuptools.build_meta"\\n'
                                         '[project]\\nname = "tiny"\\nversion = "1.0"\\n',
                       "tiny.py": "VALUE = 1\\n"}.items():
        data = text.encode()
        info = tarfile.TarInfo(f"tiny-1.0/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
sdist.chmod(0o644)
wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "--no-cache-dir", "-w", "/out", f"/in/{sdist.name}"]
for command, inputs in (([sys.executable, "-I", "-c", probe], {}),
                        (wheel, {sdist: f"/in/{sdist.name}"})):
    out = Path(tempfile.mkdtemp())
    try:
        run_contained(command, inputs=inputs, output=out, limits=Limits(wall_seconds=120), log=print,
                      what="the probe", collect=lambda made: print("made", sorted(p.name for p in made.iterdir())))
    except SandboxFailed as exc:
        print("sandbox failed:", exc)
"""


@pytest.mark.parametrize("profile", ["docker-default", "worker-seccomp"])
def test_the_workers_seccomp_profile_lets_the_non_root_worker_start_the_sandbox(
    service_image: ServiceImage, infra: Infra, profile: str
) -> None:
    options = []
    if profile == "worker-seccomp":  # what docker-compose.yml gives the worker
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        assert compose["services"]["worker"]["security_opt"] == ["seccomp=./docker/worker-seccomp.json"]
        options = [f"seccomp={(ROOT / 'docker' / 'worker-seccomp.json').read_text()}"]
    with infra.api() as api:
        container = api.create_container(
            service_image.tag,
            command=["python", "-c", SANDBOX_PROBE],
            labels={TEST_LABEL: "packaging"},
            environment={"MMS_SECRET_KEY": SECRET_KEY},
            host_config=api.create_host_config(network_mode="none", security_opt=options),
        )["Id"]
        try:
            api.start(container)
            code = api.wait(container, timeout=120)["StatusCode"]
            output = api.logs(container).decode(errors="replace")
        finally:
            api.remove_container(container, force=True)
    assert code == 0, output
    if profile == "docker-default":  # the reason the profile exists
        assert "sandbox failed: cannot start" in output or "sandbox failed: the probe failed" in output, output
        assert "inside uid" not in output, output
    else:  # its own uid, only a loopback, and no process of the worker's in sight
        assert re.search(r"inside uid 10001 interfaces \['lo'\] processes (\['1', '2'\]|\['2'\]|no /proc)", output), (
            output
        )
        assert "made ['tiny-1.0-py3-none-any.whl']" in output, output
