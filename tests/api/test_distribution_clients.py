"""Real registry clients against `mms serve`: skopeo and, where an engine runs, docker pull.

The layout holds one image per account; the principal reads one account only. skopeo is
installed by scripts/infra/skopeo.sh when missing, the engine by scripts/infra/docker-engine.sh.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.database import session_scope
from app.image_store.oci_layout import OciLayout
from app.orm import Account, RoleAssignment, ServicePrincipal
from app.services.principals import create_service_principal
from tests.image_store.test_oci_layout import BuiltImage, build_image, install_skopeo
from tests.leftover_processes import shared_infrastructure_env

INFRA = Path(__file__).resolve().parents[2] / "scripts" / "infra"
CONTENT = b"served by the model management service\n"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveRegistry:
    host: str  # 127.0.0.1:<port>
    repository: str
    image: BuiltImage
    other_repository: str
    client_id: str
    secret: str

    def reference(self, repository: str | None = None, tag: str = "1") -> str:
        return f"{self.host}/{repository or self.repository}:{tag}"


def _account(session: Session, name: str) -> Account:
    account = Account(
        subscription_id="sub-registry",
        resource_group="rg-registry",
        name=name,
        location="eastus2",
        sku_name="S1",
        sku_capacity=1,
    )
    session.add(account)
    session.flush()
    return account


@pytest.fixture(scope="module")
def live(service_context: ServiceContext, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRegistry]:
    """`mms serve` on a free port, its data folder's layout holding an image of each of two accounts."""
    settings = service_context.settings
    data_dir = tmp_path_factory.mktemp("registry-live")
    suffix = uuid.uuid4().hex[:8]
    with session_scope(service_context.session_factory) as session:
        mine, theirs = _account(session, f"reg-mine-{suffix}"), _account(session, f"reg-theirs-{suffix}")
        principal, secret = create_service_principal(
            session,
            issuer=settings.issuer,
            display_name="registry-client",
            role="Reader",
            scope=mine.scope,
            created_by=None,
        )
        ids = (mine.id, theirs.id, principal.id)
        repository, other_repository = f"{mine.id}/housing", f"{theirs.id}/housing"
        client_id = principal.client_id
    layout = OciLayout(data_dir / "images")
    image = build_image(layout, repository, "1", files={"app/hello.txt": CONTENT})
    build_image(layout, other_repository, "1", files={"app/secret.txt": b"not yours\n"})

    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MMS_")}
    env.update(
        {
            "MMS_DATABASE_URL": settings.resolved_database_url,
            "MMS_SECRET_KEY": settings.secret_key or "",
            "MMS_DATA_DIR": str(data_dir),
            "MMS_AUTO_MIGRATE": "false",
            "MMS_LOG_LEVEL": "WARNING",
        }
    )
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.2)
        yield LiveRegistry(f"127.0.0.1:{port}", repository, image, other_repository, client_id, secret)
    finally:
        server.terminate()
        server.wait(timeout=30)
        with session_scope(service_context.session_factory) as session:
            session.execute(delete(RoleAssignment).where(RoleAssignment.principal_id == ids[2]))
            session.execute(delete(ServicePrincipal).where(ServicePrincipal.id == ids[2]))
            session.execute(delete(Account).where(Account.id.in_(ids[:2])))


# -- skopeo -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def skopeo(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """The skopeo command line, and an empty auth file so no credentials but the test's are used."""
    path = install_skopeo()
    auth_file = tmp_path_factory.mktemp("skopeo") / "auth.json"
    auth_file.write_text("{}")
    return [path, "--insecure-policy", "--registries-conf", "/dev/null"], str(auth_file)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


def test_skopeo_inspects_and_copies_with_credentials(
    live: LiveRegistry, skopeo: tuple[list[str], str], tmp_path: Path
) -> None:
    command, auth_file = skopeo
    creds = f"{live.client_id}:{live.secret}"
    inspected = _run(
        [
            *command,
            "inspect",
            "--authfile",
            auth_file,
            "--tls-verify=false",
            "--creds",
            creds,
            f"docker://{live.reference()}",
        ]
    )
    assert inspected.returncode == 0, inspected.stderr
    details = json.loads(inspected.stdout)
    assert details["Digest"] == live.image.manifest_digest
    assert details["Layers"] == [live.image.layer_digest]

    target = tmp_path / "copied"
    copied = _run(
        [
            *command,
            "copy",
            "--authfile",
            auth_file,
            "--src-tls-verify=false",
            "--src-creds",
            creds,
            f"docker://{live.reference()}",
            f"dir:{target}",
        ]
    )
    assert copied.returncode == 0, copied.stderr
    layer = (target / live.image.layer_digest.removeprefix("sha256:")).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("app/hello.txt")
        assert member is not None and member.read() == CONTENT


def test_skopeo_without_credentials_or_rights_fails(live: LiveRegistry, skopeo: tuple[list[str], str]) -> None:
    command, auth_file = skopeo
    anonymous = _run(
        [*command, "inspect", "--authfile", auth_file, "--tls-verify=false", f"docker://{live.reference()}"]
    )
    assert anonymous.returncode != 0
    assert "unauthorized" in anonymous.stderr.lower() or "401" in anonymous.stderr, anonymous.stderr

    wrong = _run(
        [
            *command,
            "inspect",
            "--authfile",
            auth_file,
            "--tls-verify=false",
            "--creds",
            f"{live.client_id}:wrong-secret",
            f"docker://{live.reference()}",
        ]
    )
    assert wrong.returncode != 0

    theirs = _run(
        [
            *command,
            "inspect",
            "--authfile",
            auth_file,
            "--tls-verify=false",
            "--creds",
            f"{live.client_id}:{live.secret}",
            f"docker://{live.reference(live.other_repository)}",
        ]
    )
    assert theirs.returncode != 0
    assert "denied" in theirs.stderr.lower(), theirs.stderr


# -- docker -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The engine from scripts/infra/docker-engine.sh and a docker config folder of the test's own."""
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH")
    if os.geteuid() != 0 and not Path("/var/run/docker.sock").exists():
        pytest.skip("no Docker engine, and starting one needs root (scripts/infra/docker-engine.sh)")
    proc = subprocess.run(
        [str(INFRA / "docker-engine.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=shared_infrastructure_env(),  # the engine outlives the session
    )
    if proc.returncode != 0:
        if shutil.which("dockerd") is None:
            pytest.skip(f"the Docker engine cannot be installed here: {proc.stderr[-500:]}")
        pytest.fail(f"scripts/infra/docker-engine.sh failed: {proc.stderr[-2000:]}")
    docker_host = proc.stdout.strip().splitlines()[-1].partition("=")[2]
    config = tmp_path_factory.mktemp("docker-config")  # `docker login` writes here, not to ~/.docker
    return {**os.environ, "DOCKER_HOST": docker_host, "DOCKER_CONFIG": str(config)}


def _docker(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], input=stdin, capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_docker_login_pull_and_inspect(live: LiveRegistry, docker_env: dict[str, str]) -> None:
    reference = live.reference()
    login = _docker(docker_env, "login", live.host, "-u", live.client_id, "--password-stdin", stdin=live.secret)
    assert login.returncode == 0, login.stderr
    try:
        pulled = _docker(docker_env, "pull", reference)
        assert pulled.returncode == 0, pulled.stderr
        inspected = _docker(docker_env, "image", "inspect", reference)
        assert inspected.returncode == 0, inspected.stderr
        details = json.loads(inspected.stdout)[0]
        assert f"{live.host}/{live.repository}@{live.image.manifest_digest}" in details["RepoDigests"]
        assert details["Id"] == live.image.config_digest

        denied = _docker(docker_env, "pull", live.reference(live.other_repository))
        assert denied.returncode != 0
        assert "denied" in denied.stderr.lower(), denied.stderr
    finally:
        _docker(docker_env, "image", "rm", "-f", reference)
        _docker(docker_env, "logout", live.host)

    anonymous = _docker(docker_env, "pull", reference)
    assert anonymous.returncode != 0
