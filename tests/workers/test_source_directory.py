"""A sourceDirectory goes into the image whole: the client's archive, fetched and unpacked by the
build's fetch step, is the app root with its tree, the entry script a path in it; the scoring
server, started as the image starts it (its environment from the build), imports a module
beside the script and a package at the directory's root. No engine: the build copies this app
folder into the image as it is (COPY app/, or the oci builder's driver layer)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app.context import ServiceContext
from app.main import create_app
from app.orm.base import utcnow
from mms_client.operations import zip_source_directory
from tests.live_server import free_port, serve
from tests.scoring_server.scoring_server_harness import STARTUP_TIMEOUT, Server, server_env, stop
from workers.build_context import APP_ROOT, BuildSpec, check_spec, runtime_env
from workers.pipeline import BuildInputs, Source, StepFailed, driver_file, fetch_step

SCORE = """\
import json
from utils.features import scale   # a package at the source directory's root
import weights                     # a module beside the script

def init():
    pass

def run(raw):
    return [scale(x) * weights.FACTOR for x in json.loads(raw)["data"]]
"""


def project(root: Path) -> Path:
    source = root / "src"
    (source / "score").mkdir(parents=True)
    (source / "utils").mkdir()
    (source / "score" / "score.py").write_text(SCORE)
    (source / "score" / "weights.py").write_text("FACTOR = 10\n")
    (source / "utils" / "__init__.py").write_text("")
    (source / "utils" / "features.py").write_text("def scale(x):\n    return x + 1\n")
    (source / ".git").mkdir()
    (source / ".git" / "config").write_text("[core]\n")
    return source


@pytest.fixture()
def live_store(service_context: ServiceContext, tmp_path: Path) -> Iterator[ServiceContext]:
    """The app serving its local store's signed URLs on a real port, as a build fetches them."""
    port = free_port()
    settings = service_context.settings.model_copy(
        update={"public_url": f"http://127.0.0.1:{port}", "data_dir": tmp_path / "data"}
    )
    context = ServiceContext.build(settings, engine=service_context.engine)
    with serve(create_app(context=context), port, lifespan="off"):
        yield context


def _stored_source_directory(context: ServiceContext, source: Path, tmp_path: Path) -> str:
    archive = zip_source_directory(source, tmp_path / "src.zip")
    key = f"acct/{uuid.uuid4().hex}/src.zip"
    context.asset_store.put_file(key, archive, content_type="application/zip")
    return context.asset_store.read_url(key, expires_at=utcnow() + timedelta(hours=1))


def _inputs(url: str, entry: str) -> BuildInputs:
    return BuildInputs(
        image_name="img",
        image_version=1,
        account_id=uuid.uuid4(),
        builder="oci",
        driver_program=entry,
        assets={"src": Source(url, None, True)},
        models={},
        conda_url=None,
        pip_url=None,
        base_image=None,
        base_registry=None,
        extra_steps=None,
        labels={},
        published_base=None,
        source_directory="src",
    )


def _start(app_root: Path, env: dict[str, str], cwd: Path) -> Server:
    port = free_port()
    log = cwd / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scoring_server"],
            cwd=cwd,  # not the app root: the server itself must put it on sys.path
            env=server_env(cwd, **env, AML_APP_ROOT=str(app_root), PORT=str(port)),
            stdout=out,
            stderr=out,
        )
    server = Server(proc, port, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{server.stderr()}")
        try:
            if server.request("GET", "/").status == 200:
                return server
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise AssertionError(f"server not healthy:\n{server.stderr()}")


def test_the_source_directory_is_the_app_root_and_its_modules_import(live_store: ServiceContext, tmp_path: Path):
    url = _stored_source_directory(live_store, project(tmp_path), tmp_path)
    work = tmp_path / "build"
    work.mkdir()
    inputs = _inputs(url, "score/score.py")
    app_dir, _, _, _ = fetch_step(live_store, inputs, work, lambda line: None)
    files = sorted(p.relative_to(app_dir).as_posix() for p in app_dir.rglob("*") if p.is_file())
    assert files == ["score/score.py", "score/weights.py", "utils/__init__.py", "utils/features.py"]  # no .git
    spec = BuildSpec(
        base_image="127.0.0.1:5000/mms/inference-base:py3.11", driver_program=driver_file(inputs), app_dir=app_dir
    )
    check_spec(spec)
    env = runtime_env(spec, "/opt/mms/lib")
    assert (env["AML_APP_ROOT"], env["AZUREML_ENTRY_SCRIPT"]) == (APP_ROOT, "score/score.py")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The image's environment, with the image's app root where this test laid it out.
    server = _start(app_dir, {"AZUREML_ENTRY_SCRIPT": env["AZUREML_ENTRY_SCRIPT"]}, run_dir)
    try:
        answer = server.score({"data": [1, 2]})
        assert answer.status == 200, server.stderr()
        assert answer.json() == [20, 30]
    finally:
        stop(server.proc)


def test_an_entry_script_missing_from_the_archive_fails_the_build_naming_it(live_store: ServiceContext, tmp_path):
    url = _stored_source_directory(live_store, project(tmp_path), tmp_path)
    work = tmp_path / "build"
    work.mkdir()
    with pytest.raises(StepFailed) as failed:
        fetch_step(live_store, _inputs(url, "score.py"), work, lambda line: None)
    assert failed.value.step == "fetch"
    assert failed.value.reason == "entryScript 'score.py' is not a file in the sourceDirectory archive 'src'"


def test_the_source_archive_is_the_same_bytes_for_the_same_files(tmp_path: Path) -> None:
    source = project(tmp_path)
    first = zip_source_directory(source, tmp_path / "a.zip").read_bytes()
    time.sleep(1.1)
    (source / "utils" / "features.py").touch()  # a new mtime, the same content
    assert zip_source_directory(source, tmp_path / "b.zip").read_bytes() == first
