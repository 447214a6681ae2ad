"""A docker build's RUN steps reach the package indexes through the egress proxy, and nothing else.

One build (real engine, the build network and proxy of scripts/infra/build-network.sh) runs a
tenant-like RUN step that tries every destination a tenant would want: the engine's socket
and port, a server this test listens on at 0.0.0.0 (on the bridge's gateway and on every
address of the host), the registry, 169.254.169.254, names through the proxy that are not
listed, other ports of a listed name, DNS. Each attempt is echoed into the build log as ``mms-probe <name>: <outcome>``,
and each test asserts on the lines it is about. ``pip download`` in another RUN step shows the
indexes still work.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.config import Settings
from tests.embedded_service import HOST_CA_BUNDLE
from tests.infra import Infra
from tests.leftover_processes import shared_infrastructure_env
from tests.listeners import tcp_listener
from workers.build_context import BuildSpec
from workers.builders import BuildResult
from workers.builders.docker import DockerBuilder
from workers.pipeline import make_builder

SCORE = "def init():\n    pass\n\ndef run(data):\n    return data\n"

# Runs inside the build (the base image's python3). argv: gateway, proxy port, the test's
# server port, the registry port, the engine socket, then the host's own addresses.
PROBE = r"""
import os, socket, sys

gateway, proxy_port, server_port, registry_port, engine_socket = sys.argv[1:6]
host_addresses = sys.argv[6:]


def say(name, outcome):
    print(f"mms-probe {name}: {outcome}", flush=True)


def tcp(name, host, port, send=b""):
    with socket.socket() as s:
        s.settimeout(5)
        try:
            s.connect((host, int(port)))
        except OSError as exc:
            return say(name, f"failed ({exc.__class__.__name__}: {exc})")
        if not send:
            return say(name, "CONNECTED")
        s.sendall(send)
        try:
            answer = s.recv(200).decode(errors="replace").splitlines()
        except OSError as exc:
            answer = [f"no answer ({exc})"]
        say(name, f"CONNECTED, answered {answer[0] if answer else '(nothing)'}")


def proxy(name, request):
    # What the egress proxy answers: its status line, then "(forwarded)" when the answer is
    # not the proxy's own (tinyproxy names itself in Server: or Proxy-agent:).
    head = b""
    with socket.socket() as s:
        s.settimeout(20)
        try:
            s.connect((gateway, int(proxy_port)))
            s.sendall(request.encode() + b"\r\n\r\n")
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError as exc:
            if not head:
                return say(name, f"failed ({exc.__class__.__name__}: {exc})")
    lines = head.split(b"\r\n\r\n")[0].decode(errors="replace").splitlines() or ["(nothing)"]
    own = any(line.lower().startswith(("server: tinyproxy", "proxy-agent: tinyproxy"))
              for line in lines[1:])
    say(name, "proxy answered " + lines[0] + ("" if own else " (forwarded)"))


if os.path.exists(engine_socket):
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(engine_socket)
            say("engine-socket", "CONNECTED")
        except OSError as exc:
            say("engine-socket", f"failed ({exc.__class__.__name__}: {exc})")
else:
    say("engine-socket", "no such file")
version = b"GET /version HTTP/1.0\r\n\r\n"
tcp("engine-loopback-2375", "127.0.0.1", 2375, version)
tcp("engine-gateway-2375", gateway, 2375, version)
tcp("server-gateway", gateway, server_port, b"hello\r\n")
tcp("server-loopback", "127.0.0.1", server_port, b"hello\r\n")
for address in host_addresses:
    tcp(f"server-host-{address}", address, server_port, b"hello\r\n")
v2 = b"GET /v2/ HTTP/1.0\r\n\r\n"
tcp("registry-loopback", "127.0.0.1", registry_port, v2)
tcp("registry-gateway", gateway, registry_port, v2)
tcp("metadata", "169.254.169.254", 80, b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n")
proxy("proxy-connect-example.org", "CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443")
proxy("proxy-connect-pypi.org-22", "CONNECT pypi.org:22 HTTP/1.1\r\nHost: pypi.org:22")
proxy("proxy-connect-registry", f"CONNECT 127.0.0.1:{registry_port} HTTP/1.1\r\nHost: 127.0.0.1")
proxy("proxy-get-registry", f"GET http://127.0.0.1:{registry_port}/v2/ HTTP/1.0")
proxy("proxy-get-server", f"GET http://{gateway}:{server_port}/ HTTP/1.0")
proxy("proxy-get-metadata", "GET http://169.254.169.254/latest/meta-data/ HTTP/1.0")
proxy("proxy-connect-pypi.org", "CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443")
# Plain http to a listed name: port 80 only, however the request names host and port.
proxy("proxy-get-pypi.org-8080", "GET http://pypi.org:8080/ HTTP/1.0")
proxy("proxy-get-pypi.org-22", "GET http://pypi.org:22/ HTTP/1.0")
proxy("proxy-get-userinfo", "GET http://pypi.org:80@example.org/ HTTP/1.0")
# No absolute URL: tinyproxy takes host and port from the Host header.
proxy("proxy-host-pypi.org-22", "GET / HTTP/1.0\r\nHost: pypi.org:22")
proxy("proxy-lowercase-connect-pypi.org-22", "connect pypi.org:22 HTTP/1.0\r\nHost: pypi.org:22")
# The host is the Host header's text up to a colon: "pypi.org/.example.org", filtered as
# http://pypi.org/.example.org:22/, which must not pass for a path on pypi.org.
proxy("proxy-host-pypi.org-slash-example.org-22",
      "GET / HTTP/1.0\r\nHost: pypi.org/.example.org:22")
proxy("proxy-host-pypi.org-slash-example.org", "GET / HTTP/1.0\r\nHost: pypi.org/.example.org")
proxy("proxy-get-pypi.org", "GET http://pypi.org/simple/six/ HTTP/1.0")
proxy("proxy-get-pypi.org-80", "GET http://pypi.org:80/simple/six/ HTTP/1.0")
proxy("proxy-host-pypi.org", "GET /simple/six/ HTTP/1.0\r\nHost: pypi.org")
try:
    say("dns-pypi.org", "resolved " + socket.getaddrinfo("pypi.org", 443)[0][4][0])
except OSError as exc:
    say("dns-pypi.org", f"failed ({exc})")
say("env-https-proxy", os.environ.get("HTTPS_PROXY", "(unset)"))
"""
PROBE_LINE = re.compile(r"^mms-probe ([\w.:-]+): (.*)$")


@dataclass
class Probed:
    """What the build's RUN steps saw, what the test's server saw, and the image."""

    log: list[str]
    seen: dict[str, str]
    result: BuildResult
    gateway: str
    host_addresses: list[str]
    server_connections: list[tuple[str, int]]
    image_config: dict
    history: list[dict]
    seconds: float


def host_addresses() -> list[str]:
    """The host's IPv4 addresses, loopback and the build bridge's gateway left out."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return [m[1] for m in re.finditer(r"\binet (\d+\.\d+\.\d+\.\d+)/", out) if not m[1].startswith("127.")]


@pytest.fixture(scope="module")
def probed(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Probed:
    if not infra.build_proxy:
        pytest.fail("build-network.sh gave no proxy")
    gateway = urlsplit(infra.build_proxy).hostname
    proxy_port = urlsplit(infra.build_proxy).port
    assert gateway and proxy_port
    addresses = [a for a in host_addresses() if a != gateway]
    app = tmp_path_factory.mktemp("probe-app")
    (app / "score.py").write_text(SCORE)
    (app / "probe.py").write_text(PROBE)
    engine_socket = urlsplit(infra.docker_host).path or "/var/run/docker.sock"
    registry_port = infra.registry.rpartition(":")[2]
    nonce = uuid.uuid4().hex[:12]  # never from the cache: the steps must run
    with tcp_listener(greeting=b"host server says hello\r\n") as (server_port, peers):
        args = " ".join([gateway, str(proxy_port), str(server_port), registry_port, engine_socket, *addresses])
        steps = (
            f"RUN python3 /var/azureml-app/probe.py {args} # {nonce}\n"
            f"RUN pip download --no-deps --disable-pip-version-check -d /tmp/six "
            f"six==1.16.0 && echo mms-probe pip-download: ok {nonce}\n"
        )
        spec = BuildSpec(
            base_image=infra.base_image,
            driver_program="score.py",
            app_dir=app,
            extra_dockerfile_steps=steps,
            ca_bundles=(HOST_CA_BUNDLE,) if HOST_CA_BUNDLE.is_file() else (),
        )
        builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)
        log: list[str] = []
        repo = f"{infra.prefix}/build-network"
        started = time.monotonic()
        try:
            result = builder.build_and_push(spec, repo, nonce, log.append)
        finally:
            infra.local_images.append(f"{infra.registry}/{repo}:{nonce}")
        seconds = time.monotonic() - started
        time.sleep(0.5)  # a connection the server accepted late is still counted
    infra.pushed.append((infra.registry, repo, result.digest))
    with infra.api() as api:
        config = api.inspect_image(result.image_location)["Config"]
        history = api.history(result.image_location)
    seen = {m[1]: m[2] for m in map(PROBE_LINE.match, log) if m}
    print("\n".join(f"  {name}: {outcome}" for name, outcome in seen.items()))
    print(f"  build: {seconds:.1f} s; the test's server saw {peers or 'no connection'}")
    return Probed(log, seen, result, gateway, addresses, peers, config, history, seconds)


def _refused(outcome: str) -> bool:
    return outcome == "no such file" or outcome.startswith("failed (")


def test_pip_reaches_the_package_index_through_the_proxy(probed: Probed, infra: Infra) -> None:
    assert probed.seen["pip-download"].startswith("ok"), probed.log[-30:]
    assert any("Saved /tmp/six/six-1.16.0-py2.py3-none-any.whl" in line for line in probed.log)
    assert probed.seen["env-https-proxy"] == infra.build_proxy
    # The one tunnel the step asked for to a listed name, as a control for the refusals.
    assert probed.seen["proxy-connect-pypi.org"].endswith(" 200 Connection established")


def test_the_docker_engine_is_out_of_reach(probed: Probed) -> None:
    assert probed.seen["engine-socket"] == "no such file"
    for name in ("engine-loopback-2375", "engine-gateway-2375"):
        assert _refused(probed.seen[name]), (name, probed.seen[name])


def test_a_host_server_on_every_address_receives_no_connection(probed: Probed) -> None:
    assert probed.host_addresses, "the host has no address but loopback?"
    names = ["server-gateway", "server-loopback", *(f"server-host-{address}" for address in probed.host_addresses)]
    for name in names:
        assert _refused(probed.seen[name]), (name, probed.seen[name])
    assert probed.server_connections == []


def test_the_registry_is_out_of_reach(probed: Probed) -> None:
    for name in ("registry-loopback", "registry-gateway"):
        assert _refused(probed.seen[name]), (name, probed.seen[name])
    for name in ("proxy-connect-registry", "proxy-get-registry"):
        assert " 403 " in probed.seen[name], (name, probed.seen[name])


def test_the_metadata_address_is_out_of_reach(probed: Probed) -> None:
    assert _refused(probed.seen["metadata"]), probed.seen["metadata"]
    assert " 403 " in probed.seen["proxy-get-metadata"], probed.seen["proxy-get-metadata"]


def test_the_proxy_lets_through_only_the_listed_names_and_https_port(probed: Probed) -> None:
    for name in ("proxy-connect-example.org", "proxy-get-server", "proxy-connect-pypi.org-22"):
        assert " 403 " in probed.seen[name], (name, probed.seen[name])


def test_plain_http_reaches_a_listed_name_on_port_80_only(probed: Probed) -> None:
    # Another port of a listed name (ssh, a second service on that host) is refused by the
    # proxy itself, whichever way the request names it; before, these were forwarded.
    for name in (
        "proxy-get-pypi.org-8080",
        "proxy-get-pypi.org-22",
        "proxy-get-userinfo",
        "proxy-host-pypi.org-22",
        "proxy-lowercase-connect-pypi.org-22",
        "proxy-host-pypi.org-slash-example.org-22",
        "proxy-host-pypi.org-slash-example.org",
    ):
        assert probed.seen[name].endswith(" 403 Filtered"), (name, probed.seen[name])
    # Port 80 goes through (apt's http:// mirrors): whatever pypi.org answers, not the proxy.
    for name in ("proxy-get-pypi.org", "proxy-get-pypi.org-80", "proxy-host-pypi.org"):
        assert probed.seen[name].endswith(" (forwarded)"), (name, probed.seen[name])


def test_a_build_resolves_no_names_itself(probed: Probed) -> None:
    # No DNS: the proxy resolves the index names, so no query can carry data out.
    assert probed.seen["dns-pypi.org"].startswith("failed"), probed.seen["dns-pypi.org"]


def test_the_proxy_settings_stay_out_of_the_image(probed: Probed, infra: Infra) -> None:
    assert infra.build_proxy
    env = probed.image_config.get("Env") or []
    assert not [e for e in env if "proxy" in e.lower()], env
    created_by = [entry.get("CreatedBy") or "" for entry in probed.history]
    assert any("probe.py" in line for line in created_by)  # the history holds the RUN steps
    assert not [line for line in created_by if infra.build_proxy in line or "PROXY=" in line]


def test_host_networking_is_refused_and_no_network_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for network in ("host", "bridge", "container:abc"):
        with pytest.raises(ValueError, match="may not run in"):
            DockerBuilder(None, "127.0.0.1:5000", network=network)
    unset = DockerBuilder(None, "127.0.0.1:5000")
    assert (unset.network, unset.build_args) == ("none", {})
    proxy = "http://10.0.0.1:3128"
    proxied = DockerBuilder(None, "127.0.0.1:5000", network="mms-build", proxy=proxy)
    assert proxied.build_args["HTTPS_PROXY"] == proxied.build_args["http_proxy"] == proxy
    assert proxied.build_args["NO_PROXY"] == ""

    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"MMS_{name.upper()}", raising=False)
    monkeypatch.setenv("MMS_BUILD_NETWORK", "host")
    with pytest.raises(ValueError, match="MMS_BUILD_NETWORK=host"):
        Settings()
    # The proxy alone is the oci builder's (its RUN steps reach it through the worker); the
    # docker builder, with no network, passes it on to nothing.
    monkeypatch.setenv("MMS_BUILD_NETWORK", "")
    monkeypatch.setenv("MMS_BUILD_PROXY", "http://10.0.0.1:3128")
    alone = Settings()
    assert (alone.build_network or None, alone.build_proxy) == (None, "http://10.0.0.1:3128")
    assert make_builder(alone, "oci").build_proxy == "http://10.0.0.1:3128"  # type: ignore[union-attr]
    assert DockerBuilder(None, "127.0.0.1:5000", proxy="http://10.0.0.1:3128").build_args == {}
    monkeypatch.setenv("MMS_BUILD_NETWORK", "mms-build")
    monkeypatch.setenv("MMS_BUILD_PROXY", "http://user:secret@10.0.0.1:3128")
    with pytest.raises(ValueError, match="build_proxy"):
        Settings()
    monkeypatch.setenv("MMS_BUILD_PROXY", "http://10.0.0.1:3128")
    settings = Settings()
    assert (settings.build_network, settings.build_proxy) == ("mms-build", "http://10.0.0.1:3128")


def test_the_infra_script_is_idempotent_and_leaves_the_engine_alone(infra: Infra) -> None:
    script = Path(__file__).resolve().parents[3] / "scripts" / "infra" / "build-network.sh"
    pidfile = Path("/var/lib/mms-ci/docker/dockerd.pid")  # docker-engine.sh's default
    pid = pidfile.read_text().strip() if pidfile.exists() else None
    started = time.monotonic()
    # Should it (re)start the proxy, the proxy is shared infrastructure: it stays after the session.
    done = subprocess.run(
        [str(script)], capture_output=True, text=True, timeout=120, check=False, env=shared_infrastructure_env()
    )
    assert done.returncode == 0, done.stderr
    assert f"MMS_BUILD_NETWORK={infra.build_network}" in done.stdout
    assert f"MMS_BUILD_PROXY={infra.build_proxy}" in done.stdout
    assert "already running" in done.stderr
    assert time.monotonic() - started < 10
    status = subprocess.run([str(script), "--status"], capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "firewall: in place" in status.stdout
    if pid:
        assert pidfile.read_text().strip() == pid  # dockerd was not restarted
