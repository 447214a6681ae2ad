"""The scoring server runs on every Python a base image may have, 3.8 to 3.13.

For each version, the dependencies are what the oci builder installs for a base with that
Python (``SERVER_REQUIREMENTS`` through ``install_dependencies``: uv evaluates the markers for
the target, so 3.8 and 3.9 get the older uvicorn and click that still run there), laid out as
in an image (the server in its lib folder, the packages in MMS_SITE_PACKAGES), and the server
runs under that interpreter and scores. A version with no interpreter on this machine
(``python3.N`` on PATH, or pyenv's) is skipped.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from workers.build_context import SERVER_REQUIREMENTS, server_dir
from workers.oci.python_env import TargetPython, install_dependencies

from .scoring_server_harness import launch, stop

# The uvicorn each version gets (0.54 needs 3.10; 0.39 is the last for 3.9, 0.33 for 3.8).
EXPECTED_UVICORN = {v: "0.54.0" for v in ("3.10", "3.11", "3.12", "3.13")} | {"3.8": "0.33.0", "3.9": "0.39.0"}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SCRIPT = """
import json, os, sys
def init():
    global greeting
    greeting = open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "greeting.txt")).read()
def run(raw_data):
    return {"greeting": greeting, "echo": json.loads(raw_data), "python": "%d.%d" % sys.version_info[:2]}
"""


def _interpreter(version: str) -> str | None:
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates = [
        *sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}")),
        shutil.which(f"python{version}"),
    ]
    for candidate in filter(None, candidates):
        # A pyenv shim is on PATH for versions it does not select: it only fails when run.
        if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", list(EXPECTED_UVICORN))
def test_the_server_scores_on_each_supported_python(version: str, tmp_path: Path) -> None:
    python = _interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} interpreter on this machine")
    site = tmp_path / "site-packages"
    lines: list[str] = []
    install_dependencies(
        list(SERVER_REQUIREMENTS),
        TargetPython(version, "x86_64-manylinux_2_17", python),
        site,
        lines.append,
        ca_bundle=CA_BUNDLE if CA_BUNDLE.is_file() else None,
    )
    assert (site / f"uvicorn-{EXPECTED_UVICORN[version]}.dist-info").is_dir(), "\n".join(lines)
    lib = tmp_path / "lib"
    shutil.copytree(server_dir(), lib / "scoring_server")
    workdir = tmp_path / "app"
    workdir.mkdir()
    env = {"PYTHONPATH": f"{lib}:{site}", "MMS_SITE_PACKAGES": str(site)}
    server = launch(workdir, SCRIPT, env, {"greeting.txt": "hello"}, python=python)
    try:
        response = server.score({"x": [1, 2]})
        assert response.status == 200, server.stderr()
        assert response.json() == {"greeting": "hello", "echo": {"x": [1, 2]}, "python": version}
        assert server.request("GET", "/").status == 200
    finally:
        assert stop(server.proc) in (0, -15), server.stderr()
