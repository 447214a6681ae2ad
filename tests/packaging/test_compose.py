"""docker-compose.yml: compose itself accepts it (Compose v2, or Debian's docker-compose 1.29,
which scripts/test installs), it holds the whole stack with the docker-builder profile, no
secret has a default, and what it gives the service is a valid production configuration.

The public images it names cannot be pulled here, so the stack is validated, not started;
tests/packaging/test_image.py runs the service image itself.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SECRETS = {
    "MMS_SECRET_KEY": secrets.token_urlsafe(48),
    "MMS_POSTGRES_PASSWORD": secrets.token_urlsafe(24),
    "MMS_AZURITE_ACCOUNT_KEY": "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3Qtb25seS0xMjM0NTY=",
}
MMS_SERVICES = {"certs", "migrate", "api", "worker"}
SERVICES = {"postgres", "redis", "registry", "azurite"} | MMS_SERVICES


def _compose_command() -> list[str]:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("needs Compose: `docker compose` or `docker-compose` (scripts/test installs it)")


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run compose on the repository's file with only ``env`` (and PATH, HOME) set."""
    environment = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **(env or {})}
    return subprocess.run(
        [*_compose_command(), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


def _config(*args: str) -> dict:
    done = compose(*args, "config", env=SECRETS)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def _services(*args: str) -> set[str]:
    done = compose(*args, "config", "--services", env=SECRETS)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_compose_accepts_the_file_with_every_service_and_the_docker_builder_profile() -> None:
    assert SERVICES <= _services()
    with_engine = _config("--profile", "docker-builder")["services"]
    assert SERVICES | {"docker"} <= set(with_engine)
    assert with_engine["docker"]["profiles"] == ["docker-builder"]
    assert with_engine["docker"]["privileged"] is True


def _volume(entry: str | dict) -> tuple[str, str, bool]:
    """(source, target, read-only) of a service volume in either compose's output."""
    if isinstance(entry, dict):
        return entry.get("source", ""), entry["target"], bool(entry.get("read_only"))
    source, _, rest = entry.partition(":")
    target, _, mode = rest.partition(":")
    return source, target, "ro" in mode.split(",")


def test_no_engine_listens_on_tcp_and_only_the_workers_hold_its_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _config("--profile", "docker-builder")["services"]
    # Docker's API ports appear nowhere: not published, not in a command, a healthcheck or a
    # variable (a DOCKER_HOST=tcp://… default included).
    text = json.dumps(services)
    assert not re.search(r"\b237[56]\b", text), "a Docker API port in the compose file"
    entrypoint = (ROOT / "docker" / "dind-entrypoint.sh").read_text()
    assert '--host="unix://$socket"' in entrypoint and "tcp://" not in entrypoint
    assert not re.search(r"\b237[56]\b", entrypoint)

    engine = services["docker"]
    # Its own network namespace, on a network with the registry only: not the namespace the
    # workers and the registry share, and not the API's or the asset store's network; and on
    # an internal one with the database and the broker only, for the web-services profile.
    assert "network_mode" not in engine
    assert set(engine["networks"]) == {"engine", "deploy"}
    assert {name for name, service in services.items() if "engine" in (service.get("networks") or {})} == {
        "docker",
        "registry",
    }
    assert {name for name, service in services.items() if "deploy" in (service.get("networks") or {})} == {
        "docker",
        "postgres",
        "redis",
    }
    # The socket's volume: the engine writes it, the build and deploy workers read it, nobody
    # else mounts it.
    mounts = {
        name: [_volume(v) for v in service.get("volumes") or [] if _volume(v)[0] == "dind-socket"]
        for name, service in _config("--profile", "docker-builder", "--profile", "web-services")["services"].items()
    }
    assert {name for name, found in mounts.items() if found} == {"docker", "worker", "deployer"}
    assert mounts["worker"] == mounts["deployer"] == [("dind-socket", "/var/run/dind", True)]

    # The workers build in the engine's build network, through the proxy at its gateway.
    worker = {k: str(v) for k, v in services["worker"]["environment"].items()}
    subnet = ipaddress.ip_network(engine["environment"]["MMS_BUILD_SUBNET"])
    proxy = urlsplit(worker["MMS_BUILD_PROXY"])
    assert proxy.hostname and ipaddress.ip_address(proxy.hostname) == next(subnet.hosts())
    for name in list(os.environ):
        if name.startswith("MMS_") or name == "DOCKER_HOST":
            monkeypatch.delenv(name)
    for name, value in worker.items():
        monkeypatch.setenv(name, value.replace("$$", "$"))
    monkeypatch.setenv("DOCKER_HOST", "unix:///var/run/dind/docker.sock")  # as README says
    settings = Settings()
    assert (settings.build_network, settings.build_proxy) == ("mms-build", worker["MMS_BUILD_PROXY"])


def test_the_web_services_profile_runs_the_deploy_worker_and_gateway_in_the_engines_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The deploy worker and the gateway reach replicas on their bridges, which exist only in the
    engine's network namespace; the worker trusts the firewall the engine's container attests
    (it can read iptables there, the worker cannot); the engine still has no TCP port."""
    services = _config("--profile", "docker-builder", "--profile", "web-services")["services"]
    assert not re.search(r"\b237[56]\b", json.dumps(services))
    networks = yaml.safe_load(COMPOSE_FILE.read_text())["networks"]
    assert networks["deploy"] == {"internal": True}, "the database's second network reaches nothing else"
    for name, command in (("deployer", ["mms", "worker", "--deploy"]), ("gateway", ["mms", "gateway"])):
        service = services[name]
        assert service["profiles"] == ["web-services"]
        assert service["command"] == command
        assert service["network_mode"] == "service:docker"
        assert "ports" not in service and "networks" not in service
        assert service["depends_on"]["docker"]["condition"] == "service_healthy"
        assert service.get("healthcheck", {}).get("test"), name
    assert "8001" in json.dumps(services["docker"]["ports"]), "the gateway's port is published from its namespace"
    assert not [m for m in (_volume(v) for v in services["gateway"].get("volumes") or []) if m[0] == "dind-socket"]

    entrypoint = (ROOT / "docker" / "dind-entrypoint.sh").read_text()
    assert 'attestation="$socket_dir/service-firewall"' in entrypoint
    assert entrypoint.count('service-network.sh" --attest "$attestation"') == 2, "at start and every 30 s"
    for name in ("deployer", "gateway"):
        for variable in list(os.environ):
            if variable.startswith("MMS_") or variable == "DOCKER_HOST":
                monkeypatch.delenv(variable)
        for variable, value in services[name]["environment"].items():
            monkeypatch.setenv(variable, str(value).replace("$$", "$"))
        monkeypatch.setenv("MMS_WEB_SERVICES_PREVIEW", "true")
        settings = Settings()
        assert settings.env == "production" and settings.web_services_preview
        if name == "deployer":
            assert str(settings.service_firewall_attestation) == "/var/run/dind/service-firewall"
            assert os.environ["DOCKER_HOST"] == "unix:///var/run/dind/docker.sock"
        else:
            assert (settings.gateway_host, settings.resolved_gateway_port) == ("0.0.0.0", 8001)
    # The API makes scoringUri from the same origin the gateway is published on.
    assert str(services["api"]["environment"]["MMS_SCORING_URL"]) == "http://localhost:8001"


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_no_secret_has_a_default(name: str) -> None:
    done = compose("config", env={key: value for key, value in SECRETS.items() if key != name})
    assert done.returncode != 0
    assert name in done.stderr


def test_the_file_holds_no_literal_secret() -> None:
    text = COMPOSE_FILE.read_text()
    for value in SECRETS.values():
        assert value not in text
    # Every password, key or secret, alone or inside a URL or a connection string, is an
    # interpolation that refuses an unset or empty variable.
    required = re.compile(r"^\$\{MMS_[A-Z_]+:\?[^}]*\}")
    checked = 0
    for service in yaml.safe_load(text)["services"].values():
        for name, value in (service.get("environment") or {}).items():
            value = str(value)
            parts = re.findall(r"AccountKey=([^;]*)|://[^:/@]+:([^@]*)@", value)
            secrets_in_value = [a or b for a, b in parts]
            if re.search(r"PASSWORD|SECRET|_KEY$|ACCOUNTS", name):
                secrets_in_value.append(value.partition(":")[2] if name == "AZURITE_ACCOUNTS" else value)
            for secret in secrets_in_value:
                assert required.match(secret), f"{name}: {value}"
                checked += 1
    assert checked >= 5


def test_the_stack_is_ordered_by_health_and_the_workers_scale() -> None:
    services = _config()["services"]
    for name in ("postgres", "redis", "registry", "azurite", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), name
    # The API's healthcheck is the image's own (GET /health), so compose must not disable it.
    assert "healthcheck" not in services["api"]

    def condition(service: str, on: str) -> str:
        return services[service]["depends_on"][on]["condition"]

    assert condition("migrate", "postgres") == "service_healthy"
    for service in ("api", "worker"):
        assert condition(service, "migrate") == "service_completed_successfully"
        assert condition(service, "redis") == "service_healthy"
        assert condition(service, "azurite") == "service_healthy"
    assert condition("azurite", "certs") == "service_completed_successfully"

    images = {services[name]["image"] for name in MMS_SERVICES}
    assert len(images) == 1, "the API, the workers and the one-shots run one image"
    assert services["migrate"]["command"] == ["mms", "db", "upgrade"]
    assert services["api"]["command"][:2] == ["mms", "serve"]
    assert services["worker"]["command"][:2] == ["mms", "worker"]
    worker = services["worker"]
    assert not {"container_name", "ports", "hostname"} & set(worker), "--scale worker=N needs these unset"


@pytest.mark.parametrize("service", ["api", "worker", "migrate"])
def test_the_service_environment_is_a_valid_production_configuration(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment = _config()["services"][service]["environment"]
    for name in list(os.environ):
        if name.startswith("MMS_") or name == "DOCKER_HOST":
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, str(value).replace("$$", "$"))
    settings = Settings()
    assert settings.env == "production"
    assert settings.secret_key == SECRETS["MMS_SECRET_KEY"]
    assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://mms:")
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.asset_store == "azure" and settings.registry == "localhost:5000"
    assert "azurite:10000" in settings.effective_fetch_allow_hosts
    assert not settings.should_auto_migrate  # the migrate service does it, once

    monkeypatch.setenv("MMS_SECRET_KEY", "changeme")
    with pytest.raises(ValueError, match="MMS_SECRET_KEY"):
        Settings()


def test_the_certs_service_makes_a_certificate_its_bundle_trusts(tmp_path: Path) -> None:
    def make() -> None:
        subprocess.run(
            [sys.executable, str(ROOT / "docker" / "dev-certs.py"), str(tmp_path), "azurite", "localhost"],
            check=True,
            capture_output=True,
            timeout=60,
        )

    make()
    first = (tmp_path / "azurite.crt").read_bytes()
    make()  # a second run keeps what is still valid
    assert (tmp_path / "azurite.crt").read_bytes() == first
    assert (tmp_path / "azurite.key").stat().st_mode & 0o077 == 0

    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "azurite.crt", tmp_path / "azurite.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        # The bundle the Azure SDK is given: the public CAs plus the stack's own.
        client_context = ssl.create_default_context(cafile=str(tmp_path / "ca-bundle.crt"))
        with (
            socket.create_connection(listener.getsockname()) as raw,
            client_context.wrap_socket(raw, server_hostname="azurite") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"x")
        thread.join(timeout=5)


def test_the_service_image_runs_in_production_without_compose_saying_so() -> None:
    """A container started from the image alone (docker run) is production too: it refuses to
    start without MMS_SECRET_KEY (tests/packaging/test_image.py starts it)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    last_stage = text.rsplit("\nFROM ", 1)[1]
    environment = dict(
        pair.partition("=")[::2]
        for line in last_stage.splitlines()
        if line.startswith("ENV ")
        for pair in line[4:].split()
    )
    assert environment["MMS_ENV"] == "production"
