"""A conda file with conda packages builds on the oci builder, without conda or a container:
the packages of a channel the test writes (no public channel is reachable here) are solved
for linux-64 and installed into /opt/mms/conda, the image runs the environment's own Python
when it brings one, and the engine runs the image and it scores with a conda package, a
conda data file and a pip entry. Without a python package, the base's Python serves, with
the environment's programs on PATH."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.infra import Infra
from tests.workers.conda_channel import add_package, add_python
from tests.workers.stack import run_and_score
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.oci import OciBuilder
from workers.oci.remote_registry import RemoteRegistryClient

SCORE = """\
import json, os, sys
import six
import tinylib

def init():
    pass

def run(raw):
    with open(os.path.join(os.environ["CONDA_PREFIX"], "share/greeting/VERSION")) as f:
        greeting = f.read()
    return {"executable": sys.executable, "prefix": sys.prefix, "tinylib": tinylib.VALUE,
            "six": six.__version__, "greeting": greeting, "path": os.environ["PATH"]}
"""


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    root = tmp_path / "channel"
    for version in ("1.0.0", "1.2.3", "2.0.0"):
        add_package(root, "greeting", version, {"share/greeting/VERSION": version.encode()})
    add_package(root, "greeting-tool", "0.5", {"bin/greet": b"#!/bin/sh\necho hi\n"}, depends=["greeting >=1.2,<2"])
    # The base image's interpreter, taken as the environment's own (tests/workers/conda_channel.py).
    add_python(root, "3.11.7", "/usr/bin/python3.11")
    add_package(
        root,
        "tinylib",
        "0.3",
        {"site-packages/tinylib/__init__.py": b"VALUE = 42\n"},
        subdir="noarch",
        noarch="python",
        depends=["python >=3.8"],
    )
    return root


def _builder(infra: Infra, tmp_path: Path, channel: Path) -> OciBuilder:
    registry = f"{infra.registry}/{infra.prefix}-{uuid.uuid4().hex[:6]}"
    return OciBuilder(registry, cache_dir=tmp_path / "cache", conda_channels=[f"local=file://{channel}"])


def _read(result) -> tuple[dict, list[dict], RemoteRegistryClient, str]:
    registry, _, repo = result.image_location.rpartition(":")[0].partition("/")
    client = RemoteRegistryClient(registry)
    manifest = client.get_manifest(repo, result.digest).body
    config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))
    return config, manifest["layers"], client, repo


def _names(client: RemoteRegistryClient, repo: str, layer: dict) -> dict[str, tarfile.TarInfo]:
    with client.open_blob(repo, layer["digest"]) as chunks:
        data = gzip.decompress(b"".join(chunks))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_a_conda_environment_with_its_own_python_builds_without_a_container_and_scores(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, channel: Path, log_lines: list[str]
) -> None:
    conda_file = (
        "name: scoring\nchannels:\n  - local\ndependencies:\n  - python=3.11\n  - greeting >=1.1,<2\n"
        "  - greeting-tool\n  - tinylib\n  - pip:\n    - six==1.17.0\n"
    )
    builder = _builder(infra, tmp_path, channel)
    result = builder.build_and_push(make_spec(SCORE, conda_file=conda_file), "conda/img", "1", log_lines.append)
    config, layers, client, repo = _read(result)
    with client:
        history = [h.get("created_by", "") for h in config["history"] if not h.get("empty_layer")]
        conda_layer = next(i for i, line in enumerate(history) if "conda environment /opt/mms/conda" in line)
        files = _names(client, repo, layers[conda_layer])
    assert "opt/mms/conda/share/greeting/VERSION" in files
    assert "opt/mms/conda/lib/python3.11/site-packages/tinylib/__init__.py" in files
    assert "opt/mms/conda/conda-meta/greeting-1.2.3-0.json" in files  # the highest of 1.x
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env["PATH"].startswith("/opt/mms/conda/bin:") and env["CONDA_PREFIX"] == "/opt/mms/conda"
    assert any("the image runs the conda environment's Python 3.11.7" in line for line in log_lines)

    # The same inputs again: the same image, its conda layer made again from the package cache.
    again = builder.build_and_push(make_spec(SCORE, conda_file=conda_file), "conda/img", "2", log_lines.append)
    assert again.digest == result.digest

    infra.local_images.append(result.image_location)
    repository = result.image_location.rpartition(":")[0]
    with infra.api() as api:
        for _ in api.pull(repository, tag="1", stream=True, decode=True):
            pass
        answer = run_and_score(api, result.image_location, [[1]])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["executable"] == "/opt/mms/conda/bin/python3.11" and body["prefix"] == "/opt/mms/conda"
    assert body["tinylib"] == 42 and body["six"] == "1.17.0" and body["greeting"] == "1.2.3"


def test_conda_packages_without_python_go_on_the_base_python(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, channel: Path, log_lines: list[str]
) -> None:
    score = "import sys\n\ndef init():\n    pass\n\ndef run(raw):\n    return sys.executable\n"
    builder = _builder(infra, tmp_path, channel)
    spec = make_spec(score, conda_file="dependencies:\n  - greeting-tool\n")
    result = builder.build_and_push(spec, "conda/plain", "1", log_lines.append)
    config, layers, client, repo = _read(result)
    with client:
        server = _names(client, repo, layers[-2])
        start = server["opt/mms/bin/start"]
    assert start.isfile()
    assert not any("conda environment's Python" in line for line in log_lines)
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    assert env["PATH"].startswith("/opt/mms/conda/bin:") and "LD_LIBRARY_PATH" not in env


def test_what_cannot_be_installed_fails_the_build_naming_it(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, channel: Path, log_lines: list[str]
) -> None:
    builder = _builder(infra, tmp_path, channel)
    for conda_file, expected in (
        ("dependencies:\n  - python=3.9\n  - pip:\n    - six\n", "No candidates were found for python 3.9.*"),
        ("dependencies:\n  - greeting >=3\n", "greeting >=3"),
        ("channels: [conda-forge]\ndependencies:\n  - greeting\n", "channel 'conda-forge' is not one of"),
    ):
        with pytest.raises(BuildFailed) as failed:
            builder.build_and_push(make_spec(SCORE, conda_file=conda_file), "conda/bad", "1", log_lines.append)
        assert failed.value.step == "environment" and expected in failed.value.message, failed.value.message
