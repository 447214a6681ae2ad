"""The real Docker engine, registries and base image from scripts/infra, for every test that needs them.

The session fixture runs the idempotent infra scripts (engine, open registry on :5000,
password registry on :5002, base image); it skips only where docker cannot be installed.
Everything a test creates (images, registry manifests, containers) is removed at the end,
and so are the registries when a test session started them (the engine is shared and stays).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import httpx
import pytest

from tests.leftover_processes import hand_over, shared_infrastructure_env
from workers.builders.docker import engine_client

INFRA = Path(__file__).resolve().parents[1] / "scripts" / "infra"
TEST_LABEL = "org.mms.test"  # on every container the tests start themselves


@dataclass
class Infra:
    """Where the engine, the registries and the base image are, and what to clean up."""

    docker_host: str
    registry: str  # open
    auth_registry: str  # htpasswd
    username: str
    password: str
    base_image: str
    rootfs_tar: Path
    # The docker builder's network for RUN steps and its egress proxy (build-network.sh).
    build_network: str = "none"
    build_proxy: str | None = None
    prefix: str = field(default_factory=lambda: f"mms-test-{uuid.uuid4().hex[:8]}")
    pushed: list[tuple[str, str, str]] = field(default_factory=list)  # registry, repo, digest
    local_images: list[str] = field(default_factory=list)

    def api(self) -> docker.APIClient:
        """A fresh engine client (close it: use ``with``)."""
        return engine_client(self.docker_host, timeout=300)

    def basic_auth(self) -> dict[str, str]:
        return {"username": self.username, "password": self.password}

    @property
    def build_networking(self) -> dict[str, str | None]:
        """DockerBuilder's ``network`` and ``proxy``, as the workers get them."""
        return {"network": self.build_network, "proxy": self.build_proxy}


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """Run a scripts/infra script; what it starts is shared infrastructure unless ``env`` says otherwise."""
    env = shared_infrastructure_env() if env is None else env
    proc = subprocess.run([str(INFRA / name), *args], capture_output=True, text=True, timeout=900, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line), (lines or [""])[-1]


def registry_state() -> Path:
    """registry.sh's state folder (its pid files), as the script finds it."""
    return Path(
        os.environ.get("MMS_REGISTRY_DIR") or Path(os.environ.get("MMS_CI_STATE", "/var/lib/mms-ci")) / "registry"
    )


def registry_pids() -> list[int]:
    """The registries registry.sh started that are running (it checks a pid file's process name too)."""
    pids = []
    for name in ("open", "auth"):
        with contextlib.suppress(OSError, ValueError):
            pid = int((registry_state() / name / "registry.pid").read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == "docker-registry":
                pids.append(pid)
    return pids


@contextlib.contextmanager
def shared_registries(config: pytest.Config) -> Iterator[dict[str, str]]:
    """registry.sh --auth for this session; the last test session out stops registries a test session started.

    Test sessions on one machine share the registries: each holds a shared lock on a file while it
    uses them, and the one that gets it alone at its end stops them, when a test session started
    them (a flag file says so; registries someone started by hand are left running).
    """
    state = registry_state()
    state.mkdir(parents=True, exist_ok=True)
    started_by_tests = state / ".started-by-tests"
    with open(state / ".test-sessions", "a") as sessions:
        fcntl.flock(sessions, fcntl.LOCK_SH)
        if len(registry_pids()) < 2:
            started_by_tests.touch()
        try:
            # With this session's marker: a registry left running is a leftover process.
            registries, _ = run_script("registry.sh", "--auth", env=dict(os.environ))
            yield registries
        finally:
            try:
                fcntl.flock(sessions, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the last session out stops them
                hand_over(config, registry_pids(), "another test session, or fixture, still uses the registries")
            else:
                if started_by_tests.exists():
                    run_script("registry.sh", "--stop")
                    started_by_tests.unlink()


def running_infra(request: pytest.FixtureRequest) -> Iterator[Infra]:
    """The ``infra`` fixture (tests/conftest.py): engine, build network, registries and base image."""
    if os.geteuid() != 0 and not Path("/var/run/docker.sock").exists():
        pytest.skip("docker cannot be installed: scripts/infra needs root (apt-get, dockerd)")
    try:
        engine, _ = run_script("docker-engine.sh")
    except RuntimeError as exc:
        if shutil.which("dockerd") is None:
            pytest.skip(f"docker cannot be installed here: {exc}")
        raise
    network, _ = run_script("build-network.sh")  # docker-engine.sh made it: the values
    with shared_registries(request.config) as registries:
        base, _ = run_script("base-image.sh")
        _, tar = run_script("base-rootfs.sh")
        infra = Infra(
            docker_host=engine["DOCKER_HOST"],
            registry=registries["MMS_REGISTRY"],
            auth_registry=registries["MMS_REGISTRY_AUTH"],
            username=registries["MMS_REGISTRY_USER"],
            password=registries["MMS_REGISTRY_PASSWORD"],
            base_image=base["MMS_BASE_IMAGE"],
            rootfs_tar=Path(tar),
            build_network=network["MMS_BUILD_NETWORK"],
            build_proxy=network["MMS_BUILD_PROXY"],
        )
        try:
            yield infra
        finally:
            _clean_up(infra)


def _clean_up(infra: Infra) -> None:
    with infra.api() as api:
        for container in api.containers(all=True, filters={"label": TEST_LABEL}):
            api.remove_container(container["Id"], force=True, v=True)
        for image in infra.local_images:
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_image(image, force=True)
    with httpx.Client(timeout=10) as client:
        for registry, repo, digest in infra.pushed:
            auth = (infra.username, infra.password) if registry == infra.auth_registry else None
            client.delete(f"http://{registry}/v2/{repo}/manifests/{digest}", auth=auth)
