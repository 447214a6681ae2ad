"""RUN steps on the oci builder, run by real buildah with no Docker engine, contained.

Each step is a tenant's code and the worker runs as root: the attacks below are run as RUN
steps and what they reach is printed into the build log (or the build fails naming the
limit). Each fails if the containment it checks is taken away: a step on the host's network
reaches the test's listener, a step without a mount namespace reads its files, a step whose
root is the host's root shows an identity map, a step without a process or time limit runs
on. The built image is pulled into the engine only to score it (the smoke test's engine)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.image_store.oci_layout import OciLayout
from tests.infra import TEST_LABEL, Infra
from tests.workers.builders.test_docker_builder import serving
from workers.build_context import BuildSpec
from workers.builders import BuildFailed, BuildResult
from workers.builders.oci import OciBuilder
from workers.builders.run_limits import RunLimits
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.remote_registry import ImageReference, RemoteRegistryClient
from workers.smoke_test import smoke_test

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None, reason="buildah is not installed (scripts/bootstrap)")

SCORE = """\
def init():
    global marker
    with open("/opt/marker") as f:
        marker = f.read().strip()

def run(data):
    return {"marker": marker, "data": data}
"""
PLAIN = "def init():\n    pass\n\ndef run(data):\n    return data\n"


@pytest.fixture(autouse=True)
def worker_umask() -> Iterator[None]:
    """The umask a build worker runs with (077, SECURITY.md): the steps' runtime passes through
    folders and cgroups made under it."""
    before = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(before)


def _build(
    infra: Infra,
    spec: BuildSpec,
    tmp_path: Path,
    log: list[str],
    limits: RunLimits | None = None,
    proxy: str | None = None,
) -> BuildResult:
    registry = f"{infra.registry}/{infra.prefix}-{uuid.uuid4().hex[:6]}"
    builder = OciBuilder(registry, cache_dir=tmp_path / "cache", run_limits=limits, build_proxy=proxy)
    result = builder.build_and_push(spec, "steps/img", "1", log.append)
    host, _, repo = result.image_location.rpartition(":")[0].partition("/")
    infra.pushed.append((host, repo, result.digest))
    return result


def _image(location: str, digest: str) -> tuple[dict, dict, dict[str, tuple[tarfile.TarInfo, bytes | None]]]:
    """The image's manifest, config and the entries of its last layer."""
    host, _, repo = location.rpartition(":")[0].partition("/")
    with RemoteRegistryClient(host) as client:
        manifest = client.get_manifest(repo, digest).body
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))
        with client.open_blob(repo, manifest["layers"][-1]["digest"]) as chunks:
            data = gzip.decompress(b"".join(chunks))
    entries = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            entries[member.name] = (member, tar.extractfile(member).read() if member.isfile() else None)
    return manifest, config, entries


def _said(log: list[str], key: str) -> str:
    """What a step printed after ``key=`` (the last such line)."""
    found = [line.split("=", 1)[1] for line in log if line.startswith(f"{key}=")]
    assert found, f"the step printed no {key}=: {log[-30:]}"
    return found[-1]


def test_a_run_step_is_in_the_image_which_runs_as_its_user_and_scores(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    steps = (
        "ENV GREETING=hello\n"
        "ARG STAMP=7\n"
        'RUN echo "$GREETING-$STAMP" > /opt/marker && mkdir -p /opt/tool && echo x > /opt/tool/data\n'
        "LABEL team=ml\n"
        'RUN ["sh", "-c", "echo second=$(cat /opt/marker)"]\n'
        # Straight into "/", as on Docker, in one step and again in the next.
        "RUN mkdir /data && echo x > /data/f && ln -s /data /data-link\n"
        "RUN echo y >> /data/f && touch /at-the-root\n"
    )
    spec = make_spec(SCORE, models={"m/1/model.bin": b"w"}, extra_dockerfile_steps=steps)
    result = _build(infra, spec, tmp_path, log_lines)

    assert _said(log_lines, "second") == "hello-7"  # the steps ran in order, ENV and ARG seen
    manifest, config, entries = _image(result.image_location, result.digest)
    assert len(manifest["layers"]) == 1 + 5 + 1  # base; user, deps, server, driver, models; the steps
    assert config["history"][-1]["created_by"].startswith("mms oci builder: extra steps, run by buildah")
    assert config["history"][-2]["created_by"] == "mms oci builder: model files"  # the steps come last
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"])
    run = config["config"]
    assert run["User"] == "10002:10002" and run["Cmd"] == ["/opt/mms/bin/start"]
    assert "GREETING=hello" in run["Env"] and not any(e.startswith("STAMP=") for e in run["Env"])
    assert run["Labels"]["team"] == "ml"
    marker, data = entries["opt/marker"], entries["opt/tool/data"]
    assert marker[1] == b"hello-7\n" and data[1] == b"x\n"
    assert entries["data/f"][1] == b"x\ny\n" and entries["data-link"][0].linkname == "/data"
    assert entries["data"][0].isdir() and entries["at-the-root"][0].isfile()
    # Root in the step is root in the image (not the host ids of its user namespace).
    assert {(m.uid, m.gid) for m, _ in entries.values()} == {(0, 0)}

    if infra.docker_host:  # scored in the engine, as the image's own user
        with infra.api() as api:
            api.pull(result.image_location)
        infra.local_images.append(result.image_location)
        smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=60)
        with serving(infra, result.image_location) as url:
            answer = httpx.post(f"{url}/score", json={"a": 1}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"marker": "hello-7", "data": '{"a":1}'}  # run() gets the raw body
        with infra.api() as api:
            seen = api.inspect_image(result.image_location)["Config"]["User"]
        assert seen == "10002:10002"


# A copy of cat with CAP_NET_BIND_SERVICE (bit 10) as a file capability, effective: what
# `setcap cap_net_bind_service+ep` writes (the base has no setcap).
SETCAP = (
    "import os, shutil, struct; shutil.copy('/bin/cat', '/opt/capcat'); "
    "os.setxattr('/opt/capcat', 'security.capability', struct.pack('<5I', 0x02000001, 1 << 10, 0, 0, 0)); "
    "print('seen=' + os.getxattr('/opt/capcat', 'security.capability').hex())"
)


def test_a_file_capability_set_in_a_step_is_honoured_where_the_image_runs(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    spec = make_spec(PLAIN, extra_dockerfile_steps=f'RUN python3 -c "{SETCAP}"')
    result = _build(infra, spec, tmp_path, log_lines)

    seen = bytes.fromhex(_said(log_lines, "seen"))  # v2 inside the step's namespace
    _, _, entries = _image(result.image_location, result.digest)
    stored = entries["opt/capcat"][0].pax_headers["SCHILY.xattr.security.capability"]
    assert stored.encode("utf-8", "surrogateescape") == seen  # not v3 with a far host uid as root
    assert any("file capabilities (setcap) on /opt/capcat" in line for line in log_lines)
    if not infra.docker_host:
        return
    with infra.api() as api:
        api.pull(result.image_location)
        infra.local_images.append(result.image_location)

        def effective(**host: object) -> int:
            cid = api.create_container(
                result.image_location,
                command=["/opt/capcat", "/proc/self/status"],
                entrypoint=[],
                labels={TEST_LABEL: "1"},
                host_config=api.create_host_config(network_mode="none", **host),
            )["Id"]
            try:
                api.start(cid)
                api.wait(cid, timeout=60)
                status = api.logs(cid).decode()
            finally:
                api.remove_container(cid, force=True)
            return int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)

        assert effective() == 1 << 10  # the image's user (10002) gains it, as from the docker builder
        assert effective(security_opt=["no-new-privileges"]) == 0  # as the smoke test runs images


def test_a_run_step_is_root_only_in_its_own_user_namespace_with_few_capabilities(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    steps = (
        "RUN echo uid=$(id -u) && echo map=$(cat /proc/self/uid_map) && "
        "echo nnp=$(grep NoNewPrivs /proc/self/status | cut -f2) && "
        "echo seccomp=$(grep '^Seccomp:' /proc/self/status | cut -f2) && "
        "echo capeff=$(grep CapEff /proc/self/status | cut -f2) && "
        "(unshare -U true 2>/dev/null && echo unshare=yes || echo unshare=no) && "
        "(mount -t tmpfs none /mnt 2>/dev/null && echo mount=yes || echo mount=no)"
    )
    _build(infra, make_spec(PLAIN, extra_dockerfile_steps=steps), tmp_path, log_lines)

    assert _said(log_lines, "uid") == "0"
    inside, host, size = (int(n) for n in _said(log_lines, "map").split())
    assert inside == 0 and host >= 1 << 30 and size == 65536  # root inside is a far host uid
    assert _said(log_lines, "nnp") == "1" and _said(log_lines, "seccomp") == "2"
    caps = int(_said(log_lines, "capeff"), 16)
    for bit in (21, 12, 13, 18, 27, 16):  # SYS_ADMIN, NET_ADMIN, NET_RAW, SYS_CHROOT, MKNOD, SYS_MODULE
        assert not caps & (1 << bit)
    assert _said(log_lines, "unshare") == "no" and _said(log_lines, "mount") == "no"


def test_a_run_step_reads_none_of_the_workers_files(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    token = uuid.uuid4().hex
    secret = Path(f"/etc/mms-secret-{token[:8]}")
    secret.write_text(f"host-secret-{token}\n")
    secret.chmod(0o644)  # readable to anyone on the host: only the container keeps it out
    data = tmp_path / "data"
    data.mkdir()
    (data / "secret.key").write_text(f"data-secret-{token}\n")
    (data / "secret.key").chmod(0o644)
    data.chmod(0o755)
    try:
        steps = (
            f"RUN cat {secret} {data}/secret.key /proc/1/root{secret} 2>&1; "
            "ls -d /tmp/mms-scratch-* /var/lib/containers /work 2>&1; "
            "grep -l MMS_ /proc/*/environ 2>/dev/null; echo done=1"
        )
        _build(infra, make_spec(PLAIN, extra_dockerfile_steps=steps), tmp_path, log_lines)
    finally:
        secret.unlink()
    log = "\n".join(log_lines)
    assert _said(log_lines, "done") == "1"
    assert token not in log.replace(f"mms-secret-{token[:8]}", "")  # neither secret's content
    assert "No such file" in log
    assert not any(line.startswith("/tmp/mms-scratch-") for line in log_lines)  # buildah's storage


@pytest.fixture
def listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP server on the host's every address (0.0.0.0); yields its port and who connected."""
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    seen: list[str] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            seen.append(peer[0])
            conn.sendall(b"reached\n")
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], seen
    finally:
        stop.set()
        thread.join()
        server.close()


def _host_addresses() -> list[str]:
    addresses = {"127.0.0.1", "172.30.213.1"}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            addresses.add(probe.getsockname()[0])
        except OSError:
            pass
    return sorted(addresses)


def test_a_run_step_reaches_no_host_service_no_engine_and_no_network(
    infra: Infra,
    make_spec: Callable[..., BuildSpec],
    tmp_path: Path,
    log_lines: list[str],
    listener: tuple[int, list[str]],
) -> None:
    port, seen = listener
    targets = [(a, port) for a in _host_addresses()] + [
        ("127.0.0.1", 5000),
        ("127.0.0.1", 2375),
        ("169.254.169.254", 80),
    ]
    probe = (
        "import socket\n"
        f"for host, port in {targets!r}:\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close(); print(f'reach={host}:{port} open')\n"
        "    except OSError as exc:\n"
        "        print(f'reach={host}:{port} {type(exc).__name__}')\n"
        "import os\n"
        "print('socket=' + str(os.path.exists('/var/run/docker.sock') or os.path.exists('/run/docker.sock')))\n"
        "print('interfaces=' + ','.join(sorted(os.listdir('/sys/class/net'))))\n"
    )
    steps = f"RUN echo {base64.b64encode(probe.encode()).decode()} | base64 -d | python3"
    _build(infra, make_spec(PLAIN, extra_dockerfile_steps=steps), tmp_path, log_lines)

    reached = [line for line in log_lines if line.startswith("reach=")]
    assert len(reached) == len(targets)
    assert not [line for line in reached if line.endswith(" open")], reached
    assert seen == []  # the host's listener saw no connection
    assert _said(log_lines, "socket") == "False"
    assert _said(log_lines, "interfaces") == "lo"  # no network but its own loopback


def test_a_fork_bomb_is_bounded_and_the_build_fails_naming_the_limit(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    limits = RunLimits(pids=64, seconds=120)
    spec = make_spec(PLAIN, extra_dockerfile_steps="RUN bomb() { bomb | bomb & }; bomb; sleep 100")
    started = time.monotonic()
    with pytest.raises(BuildFailed) as failed:
        _build(infra, spec, tmp_path, log_lines, limits)
    assert failed.value.step == "extra-steps"
    assert "process limit of 64" in failed.value.message and "MMS_BUILD_RUN_PIDS" in failed.value.message
    assert time.monotonic() - started < 90  # killed at the limit, not at the time limit
    assert not list(Path("/sys/fs/cgroup").glob("*/mms-build-*"))  # no cgroup left behind


def test_a_step_past_the_time_limit_is_killed_and_named(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    limits = RunLimits(seconds=5)
    spec = make_spec(PLAIN, extra_dockerfile_steps="RUN echo start && sleep 300")
    started = time.monotonic()
    with pytest.raises(BuildFailed) as failed:
        _build(infra, spec, tmp_path, log_lines, limits)
    assert failed.value.step == "extra-steps"
    assert "time limit of 5 s" in failed.value.message and "MMS_BUILD_RUN_SECONDS" in failed.value.message
    assert time.monotonic() - started < 120


def test_a_memory_hog_fails_naming_the_memory_limit(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    limits = RunLimits(memory_mb=96)
    hog = "python3 -c 'b = [bytearray(16 << 20) for _ in range(64)]; print(len(b))'"
    with pytest.raises(BuildFailed) as failed:
        _build(infra, make_spec(PLAIN, extra_dockerfile_steps=f"RUN {hog}"), tmp_path, log_lines, limits)
    assert "memory limit of 96 MB" in failed.value.message and "MMS_BUILD_RUN_MEMORY_MB" in failed.value.message


def test_a_step_that_writes_past_the_disk_limit_fails_naming_it(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    limits = RunLimits(disk_mb=20)
    spec = make_spec(PLAIN, extra_dockerfile_steps="RUN head -c 40000000 /dev/urandom > /opt/big && sleep 5")
    with pytest.raises(BuildFailed) as failed:
        _build(infra, spec, tmp_path, log_lines, limits)
    assert "disk limit of 20 MB" in failed.value.message and "MMS_BUILD_RUN_DISK_MB" in failed.value.message


def test_without_buildah_a_run_step_fails_at_once_naming_it(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str], monkeypatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(BuildFailed) as failed:
        _build(infra, make_spec(PLAIN, extra_dockerfile_steps="ENV A=1\nRUN echo hi"), tmp_path, log_lines)
    assert failed.value.step == "extra-steps"
    assert "RUN echo hi" in failed.value.message and "buildah" in failed.value.message
    assert "install" in failed.value.message and "docker builder" in failed.value.message
    assert not any("reading base image" in line for line in log_lines)  # before anything was pulled


def _copy_base(infra: Infra, store: ImageStoreClient) -> str:
    """The session's base image, copied into the service's own store as mms/base:py3.11."""
    ref = ImageReference.parse(infra.base_image)
    with RemoteRegistryClient(ref.host) as source:
        manifest = source.get_manifest(ref.repository, ref.reference)
        for blob in [manifest.body["config"], *manifest.body["layers"]]:
            data = source.get_blob(ref.repository, blob["digest"], max_bytes=1 << 30)
            store.push_blob("mms/base", blob["digest"], len(data), lambda d=data: iter([d]))
        store.put_manifest("mms/base", "py3.11", manifest.raw, manifest.media_type)
    return "embedded.test/mms/base:py3.11"


def test_a_run_step_on_the_embedded_default_stores_the_image_in_the_services_store(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    layout = OciLayout(tmp_path / "images")
    store = ImageStoreClient(layout, "embedded.test")
    base = _copy_base(infra, store)
    builder = OciBuilder("embedded.test", layout=layout, cache_dir=tmp_path / "cache")
    spec = make_spec(SCORE, base_image=base, extra_dockerfile_steps="RUN echo embedded > /opt/marker")
    result = builder.build_and_push(spec, "acct/img", "1", log_lines.append)

    stored = store.get_manifest("acct/img", "1")
    assert stored.digest == result.digest
    config = json.loads(store.get_blob("acct/img", stored.body["config"]["digest"]))
    assert config["config"]["User"] == "10002:10002"
    last = stored.body["layers"][-1]["digest"]
    with store.open_blob("acct/img", last) as chunks:
        data = gzip.decompress(b"".join(chunks))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("opt/marker").read() == b"embedded\n"


# -- with the build proxy (MMS_BUILD_PROXY) ----------------------------------------------------


def test_with_the_build_proxy_pip_installs_from_pypi_and_the_proxy_stays_out_of_the_image(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    assert infra.build_proxy, "build-network.sh gave no proxy"
    steps = (
        'RUN echo "proxy=$HTTPS_PROXY" && echo "no_proxy=[$NO_PROXY]" && '
        "python3 -m pip install --no-cache-dir --disable-pip-version-check --target /opt/pkgs six==1.16.0 && "
        "echo six=$(PYTHONPATH=/opt/pkgs python3 -c 'import six; print(six.__version__)')\n"
    )
    started = time.monotonic()
    result = _build(
        infra,
        make_spec(PLAIN, extra_dockerfile_steps=steps),
        tmp_path,
        log_lines,
        RunLimits(seconds=240),
        proxy=infra.build_proxy,
    )
    assert time.monotonic() - started < 400

    assert _said(log_lines, "six") == "1.16.0"  # downloaded from PyPI through the proxy, and imported
    local = _said(log_lines, "proxy")
    assert local.startswith("http://127.0.0.1:") and _said(log_lines, "no_proxy") == "[]"
    _, config, entries = _image(result.image_location, result.digest)
    assert entries["opt/pkgs/six.py"][1] and b"Benjamin Peterson" in entries["opt/pkgs/six.py"][1]
    # Neither the proxy (its variables, its address) nor the mounted CA bundle is in the image.
    assert not [name for name in entries if "mms-build-ca" in name or name.startswith(("run/", "dev/"))]
    env = config["config"].get("Env") or []
    assert not [e for e in env if "proxy" in e.lower() or e.startswith(("PIP_CERT=", "SSL_CERT_FILE="))], env
    text = json.dumps(config)  # the history too (its last entry names the step, whose text says $HTTPS_PROXY)
    assert local not in text and infra.build_proxy not in text and "mms-build-ca" not in text


# What a tenant's step tries (the base image's python3). argv: the test's server port, the
# registry port, the proxy's host and port (as the worker reaches it), then the host's addresses.
NET_PROBE = r"""
import fcntl, os, socket, struct, sys

server_port, registry_port, gateway, proxy_port = sys.argv[1:5]
addresses = sys.argv[5:]
local = os.environ["HTTPS_PROXY"].rpartition("/")[2].split(":")


def say(name, outcome):
    print(f"{name}={outcome}", flush=True)


def tcp(name, host, port):
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        say(name, "open")
    except OSError as exc:
        say(name, type(exc).__name__)


def proxy(name, request):
    try:
        with socket.create_connection((local[0], int(local[1])), timeout=20) as s:
            s.sendall(request.encode() + b"\r\n\r\n")
            say(name, s.recv(200).split(b"\r\n")[0].decode(errors="replace"))
    except OSError as exc:
        say(name, type(exc).__name__)


def attempt(name, call):
    try:
        call()
        say(name, "done")
    except OSError as exc:
        say(name, f"errno{exc.errno}")


for address in addresses:
    tcp(f"server-{address}", address, server_port)
tcp("proxy-direct", gateway, proxy_port)
tcp("registry-loopback", "127.0.0.1", registry_port)
tcp("registry-gateway", gateway, registry_port)
tcp("engine-2375", "127.0.0.1", 2375)
tcp("metadata", "169.254.169.254", 80)
proxy("via-pypi", "CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443")
proxy("via-example", "CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443")
proxy("via-pypi-22", "CONNECT pypi.org:22 HTTP/1.1\r\nHost: pypi.org:22")
proxy("via-server-loopback", f"CONNECT 127.0.0.1:{server_port} HTTP/1.1\r\nHost: 127.0.0.1")
proxy("via-server-gateway", f"GET http://{gateway}:{server_port}/ HTTP/1.0")
proxy("via-server-host", f"GET http://{addresses[-1]}:{server_port}/ HTTP/1.0")
proxy("via-registry", f"GET http://127.0.0.1:{registry_port}/v2/ HTTP/1.0")
proxy("via-metadata", "GET http://169.254.169.254/latest/meta-data/ HTTP/1.0")
say("interfaces", ",".join(sorted(os.listdir("/sys/class/net"))) if os.path.isdir("/sys/class/net") else "none")
say("netdev", ",".join(sorted(line.split(":")[0].strip() for line in open("/proc/net/dev").readlines()[2:])))
ifr = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("lo-down", lambda: fcntl.ioctl(ifr, 0x8914, struct.pack("16sh", b"lo", 0)))  # SIOCSIFFLAGS
attempt("addr-add", lambda: fcntl.ioctl(ifr, 0x8916, struct.pack("16sHH4s8x", b"lo", socket.AF_INET, 0,
                                                                  socket.inet_aton("10.9.9.9"))))  # SIOCSIFADDR
attempt("raw-socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("packet-socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())


def new_link():  # RTM_NEWLINK, a dummy interface named mmsx0: what `ip link add` sends
    def attr(kind, data):
        size = 4 + len(data)
        return struct.pack("HH", size, kind) + data + b"\0" * (-size % 4)
    body = struct.pack("BxHiII", 0, 0, 0, 0, 0) + attr(3, b"mmsx0\0") + attr(18, attr(1, b"dummy"))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as s:
        s.settimeout(5)
        s.sendto(struct.pack("IHHII", 16 + len(body), 16, 0x1 | 0x4 | 0x200 | 0x400, 1, 0) + body, (0, 0))
        error = struct.unpack("i", s.recv(4096)[16:20])[0]
    if error:
        raise OSError(-error, os.strerror(-error))


attempt("link-add", new_link)
"""


def test_with_the_build_proxy_a_run_step_reaches_the_proxy_and_nothing_else(
    infra: Infra,
    make_spec: Callable[..., BuildSpec],
    tmp_path: Path,
    log_lines: list[str],
    listener: tuple[int, list[str]],
) -> None:
    assert infra.build_proxy
    port, seen = listener
    gateway, _, proxy_port = infra.build_proxy.removeprefix("http://").rstrip("/").partition(":")
    addresses = _host_addresses()  # loopback, the bridge's gateway (the proxy's host), the host's own
    args = " ".join([str(port), infra.registry.rpartition(":")[2], gateway, proxy_port, *addresses])
    steps = (
        f"RUN echo {base64.b64encode(NET_PROBE.encode()).decode()} | base64 -d > /tmp/p.py && python3 /tmp/p.py {args}"
    )
    started = time.monotonic()
    _build(
        infra,
        make_spec(PLAIN, extra_dockerfile_steps=steps),
        tmp_path,
        log_lines,
        RunLimits(seconds=240),
        proxy=infra.build_proxy,
    )
    assert time.monotonic() - started < 400

    # Nothing else directly: not the host's loopback, its addresses, the proxy's host on the
    # proxy's own port or any other, the registry, the engine, 169.254.169.254.
    for address in addresses:
        assert _said(log_lines, f"server-{address}") in ("ConnectionRefusedError", "OSError"), address
    for name in ("proxy-direct", "registry-gateway", "metadata"):
        assert _said(log_lines, name) == "OSError", name  # network unreachable: no route at all
    for name in ("registry-loopback", "engine-2375"):
        assert _said(log_lines, name) == "ConnectionRefusedError", name  # its own loopback
    # Nothing else through the proxy: other names, other ports, addresses.
    for name in ("via-example", "via-pypi-22", "via-server-loopback", "via-server-gateway", "via-server-host"):
        assert " 403 " in _said(log_lines, name), name
    for name in ("via-registry", "via-metadata"):
        assert " 403 " in _said(log_lines, name), name
    assert seen == []  # the test's server, on every address of the host, saw no connection
    # The control: a listed name on 443 goes through.
    assert _said(log_lines, "via-pypi").endswith(" 200 Connection established")
    # Its namespace: loopback only, and the step's root cannot change it.
    assert _said(log_lines, "netdev") == "lo" and _said(log_lines, "interfaces") == "none"
    for name in ("lo-down", "addr-add", "raw-socket", "packet-socket", "link-add"):
        assert _said(log_lines, name) == "errno1", name  # EPERM
