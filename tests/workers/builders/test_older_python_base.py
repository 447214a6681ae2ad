"""A base with an older Python end to end: `mms base-image publish --release bullseye` makes
a Debian bullseye (Python 3.9) base, the oci builder builds on it (the scoring server's
dependencies and the manifest's compiled wheels chosen for 3.9), and the image, run by the
engine, scores."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.database import make_engine, make_session_factory, session_scope
from app.services.base_images import default_base_image, list_base_images
from tests.infra import Infra
from tests.workers.stack import run_and_score
from workers.build_context import BuildSpec
from workers.builders.oci import OciBuilder

SCORE = """
import json, sys
import numpy

def init():
    pass

def run(raw_data):
    rows = numpy.array(json.loads(raw_data)["data"])
    return {"python": list(sys.version_info[:2]), "sums": rows.sum(axis=1).tolist()}
"""


@pytest.fixture(scope="module")
def bullseye_base(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """`mms base-image publish --release bullseye` under this session's registry prefix:
    (registry, its stderr, the data dir)."""
    # A prefix of its own: other tests of the session publish bookworm (and its latest) too.
    prefix = f"{infra.prefix}/older-python"
    registry = f"{infra.registry}/{prefix}"
    data_dir = tmp_path_factory.mktemp("bullseye-publish")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_REGISTRY": registry})
    done = subprocess.run(
        [sys.executable, "-m", "workers", "base-image", "publish", "--release", "bullseye"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return registry, done.stderr, data_dir


def test_bullseye_publishes_as_py39_listed_but_not_the_default_and_not_latest(
    infra: Infra, bullseye_base: tuple[str, str, Path]
) -> None:
    registry, printed, data_dir = bullseye_base
    tag = f"py3.9-{datetime.now(UTC):%Y%m%d}"
    reference = f"{registry}/mms/inference-base:{tag}"
    assert f"published {reference} (variant cpu-bullseye)" in printed, printed
    repo = f"{registry.partition('/')[2]}/mms/inference-base"
    tags = httpx.get(f"http://{infra.registry}/v2/{repo}/tags/list", timeout=10).json()["tags"]
    assert {tag, "py3.9"} <= set(tags)
    assert "latest" not in tags  # latest is the bookworm cpu base's
    engine = make_engine(Settings(data_dir=data_dir, secret_key="x" * 40))
    with session_scope(make_session_factory(engine)) as session:
        listed = [e for e in list_base_images(session) if e.variant == "cpu-bullseye"]
        assert [(e.reference, e.python_version) for e in listed] == [(reference, "3.9")]
        assert default_base_image(session) is None  # the default FROM stays bookworm's
    engine.dispose()


def test_an_image_built_on_bullseye_runs_python_3_9_and_scores(
    infra: Infra, bullseye_base: tuple[str, str, Path], tmp_path: Path
) -> None:
    registry, _, _ = bullseye_base
    app = tmp_path / "app"
    app.mkdir()
    (app / "score.py").write_text(SCORE)
    spec = BuildSpec(
        base_image=f"{registry}/mms/inference-base:py3.9",
        driver_program="score.py",
        app_dir=app,
        pip_requirements="numpy==2.0.2\n",  # cp39 wheels: the last numpy for 3.9
    )
    lines: list[str] = []
    result = OciBuilder(registry, cache_dir=tmp_path / "cache").build_and_push(spec, "py39/img", "1", lines.append)
    log = "\n".join(lines)
    assert "base image runs Python 3.9 on x86_64-manylinux_2_31" in log, log
    repository = result.image_location.rpartition(":")[0]
    infra.pushed.append((infra.registry, f"{registry.partition('/')[2]}/py39/img", result.digest))
    infra.local_images.append(result.image_location)
    with infra.api() as api:
        for _ in api.pull(repository, tag="1", stream=True, decode=True):
            pass
        answer = run_and_score(api, result.image_location, [[1, 2, 3], [4, 5, 6]])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"python": [3, 9], "sums": [6, 15]}
