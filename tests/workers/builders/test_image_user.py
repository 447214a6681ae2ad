"""Built images run as their non-root user, on both builders, over files it cannot rewrite.

The layers and config of an oci-built image are read from the registry; images of both
builders are then run in the real engine, with their own user, HOME and WORKDIR, to ask the
process who it is and what it can write, and served by the smoke test as that user."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from collections.abc import Callable

import pytest

from tests.infra import TEST_LABEL, Infra
from tests.workers.builders.test_docker_builder import build, push_base
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.docker import DockerBuilder
from workers.builders.oci import OciBuilder
from workers.oci.remote_registry import RemoteRegistryClient
from workers.smoke_test import smoke_test

SCORE = """\
import os

def init():
    global weights
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.bin")) as f:
        weights = f.read()

def run(data):
    return {"weights": weights}
"""

# What the image's process sees: run with the image's own user, HOME and working folder.
PROBE = """\
import getpass, json, os, pwd, tempfile

def writable(folder):
    try:
        with open(os.path.join(folder, ".probe"), "w") as f:
            f.write("x")
    except OSError:
        return False
    os.remove(os.path.join(folder, ".probe"))
    return True

home = os.environ["HOME"]
print(json.dumps({
    "uid": os.getuid(),
    "gid": os.getgid(),
    "name": pwd.getpwuid(os.getuid()).pw_name,
    "getuser": getpass.getuser(),
    "passwd_home": pwd.getpwuid(os.getuid()).pw_dir,
    "home": home,
    "expanduser": os.path.expanduser("~"),
    "home_entries": sorted(os.listdir(home)),
    "home_writable": writable(home),
    "tmp": tempfile.gettempdir(),
    "tmp_writable": writable(tempfile.gettempdir()),
    "cwd": os.getcwd(),
    "cwd_writable": writable("."),
    "server_writable": writable("/opt/mms/lib/scoring_server")
        or os.access("/opt/mms/lib/scoring_server/app.py", os.W_OK),
    "model_writable": os.access(os.environ["AZUREML_MODEL_DIR"] + "/model.bin", os.W_OK),
    "model": open(os.environ["AZUREML_MODEL_DIR"] + "/model.bin").read(),
    "build_uid": open("/opt/build-uid").read().strip() if os.path.exists("/opt/build-uid") else None,
}))
"""


def probe(infra: Infra, image: str) -> dict:
    """Run PROBE in ``image`` as the image says (user, HOME, WORKDIR); return what it printed."""
    with infra.api() as api:
        cid = api.create_container(
            image,
            command=["python3", "-c", PROBE],
            labels={TEST_LABEL: "1"},
            host_config=api.create_host_config(network_mode="none"),
        )["Id"]
        try:
            api.start(cid)
            status = api.wait(cid, timeout=60)["StatusCode"]
            output = api.logs(cid).decode()
        finally:
            api.remove_container(cid, force=True, v=True)
    assert status == 0, output
    return json.loads(output.strip().splitlines()[-1])


def assert_runs_as_its_user(seen: dict) -> None:
    assert (seen["uid"], seen["gid"]) == (10002, 10002)
    assert seen["name"] == seen["getuser"] == "scoring"  # an /etc/passwd entry, not a bare number
    assert seen["home"] == seen["expanduser"] == seen["passwd_home"] == "/home/scoring"
    assert seen["home_writable"] and seen["tmp_writable"] and seen["tmp"] == "/tmp"
    # A web service's replica gets a memory-backed $HOME (workers/containment.py), which hides
    # what the image has there: the builders leave it empty.
    assert seen["home_entries"] == []
    # What the image serves is readable and nothing of it writable: not the scoring server,
    # not the model, not the app folder it starts in.
    assert seen["model"] == "weights-1"
    assert seen["cwd"] == "/var/azureml-app" and not seen["cwd_writable"]
    assert not seen["server_writable"] and not seen["model_writable"]


def test_an_oci_image_runs_as_its_user_over_root_owned_files(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path, log_lines: list[str]
) -> None:
    registry = f"{infra.registry}/{infra.prefix}-{uuid.uuid4().hex[:6]}"
    spec = make_spec(SCORE, models={"m/1/model.bin": b"weights-1"}, extra_dockerfile_steps="ENV A=1")
    result = OciBuilder(registry, cache_dir=tmp_path / "cache").build_and_push(spec, "user/img", "1", log_lines.append)
    host, _, repo = result.image_location.rpartition(":")[0].partition("/")
    infra.pushed.append((host, repo, result.digest))
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}  # the new layers', later wins
    with RemoteRegistryClient(host) as client:
        manifest = client.get_manifest(repo, result.digest).body
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))["config"]
        for layer in manifest["layers"][1:]:  # the base is one layer
            with client.open_blob(repo, layer["digest"]) as chunks:
                data = gzip.decompress(b"".join(chunks))
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    entries[member.name] = (member, tar.extractfile(member).read() if member.isfile() else None)

    assert config["User"] == "10002:10002"
    assert "HOME=/home/scoring" in config["Env"]
    home, tmp = entries["home/scoring"][0], entries["tmp"][0]
    assert home.isdir() and (home.uid, home.gid, home.mode) == (10002, 10002, 0o755)
    assert tmp.isdir() and (tmp.uid, tmp.mode) == (0, 0o1777)
    passwd, group = entries["etc/passwd"][1], entries["etc/group"][1]
    assert passwd.startswith(b"root:x:0:0:")  # the base's own lines are kept
    assert passwd.endswith(b"\nscoring:x:10002:10002:scoring server:/home/scoring:/usr/sbin/nologin\n")
    assert group.startswith(b"root:x:0:") and group.endswith(b"\nscoring:x:10002:\n")
    served = {n: m for n, (m, _) in entries.items() if n.startswith(("var/azureml-app/", "opt/mms/"))}
    assert "var/azureml-app/azureml-models/m/1/model.bin" in served and "opt/mms/lib/scoring_server/app.py" in served
    for name, member in served.items():
        assert (member.uid, member.gid) == (0, 0), name
        assert member.mode & 0o444 == 0o444 and not member.mode & 0o022, name

    smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=60, pull=True)
    assert log_lines[-1].startswith("mms: smoke test passed")
    with infra.api() as api:
        for _ in api.pull(result.image_location, stream=True, decode=True):
            pass
    infra.local_images.append(result.image_location)
    assert_runs_as_its_user(probe(infra, result.image_location))


def test_a_docker_image_runs_as_its_user_though_the_base_and_the_steps_built_as_others(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    # A base that leaves its own non-root user set: the build's steps still run as root.
    base = f"{infra.registry}/{infra.prefix}/nobody-base:1"
    push_base(infra, base, f"FROM {infra.base_image}\nUSER 65534:65534\n")
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)
    spec = make_spec(
        SCORE,
        models={"m/1/model.bin": b"weights-1"},
        base_image=base,
        # A tenant's RUN step runs as root at build time, as before; it cannot pick the user.
        extra_dockerfile_steps=f"RUN id -u > /opt/build-uid # {uuid.uuid4().hex}",
    )
    result = build(infra, builder, spec, "user", "1", log_lines.append)
    with infra.api() as api:
        config = api.inspect_image(result.image_location)["Config"]
    assert config["User"] == "10002:10002"
    seen = probe(infra, result.image_location)
    assert seen["build_uid"] == "0"
    assert_runs_as_its_user(seen)
    smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=60)
    assert log_lines[-1].startswith("mms: smoke test passed")


@pytest.mark.parametrize("step", ["USER root", "user 0:0", "RUN true\nUSER 0"])
def test_an_extra_step_cannot_make_the_image_run_as_root(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path, log_lines: list[str], step: str
) -> None:
    spec = make_spec(SCORE, extra_dockerfile_steps=step)
    docker = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)
    oci = OciBuilder(f"{infra.registry}/{infra.prefix}", cache_dir=tmp_path / "cache")
    for builder in (docker, oci):
        with pytest.raises(BuildFailed) as failed:
            builder.build_and_push(spec, f"{infra.prefix}/root", "1", log_lines.append)
        assert "extraDockerfileSteps" in failed.value.message and "USER is not allowed" in failed.value.message
        assert "non-root" in failed.value.message
