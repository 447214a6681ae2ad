"""`mms base-image publish` against the real engine and registry."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.infra import Infra


def test_publish_pushes_a_dated_tag_and_records_it(infra: Infra, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    env.update({"MMS_DATA_DIR": str(tmp_path), "MMS_REGISTRY": infra.registry, "DOCKER_HOST": infra.docker_host})
    done = subprocess.run(
        [sys.executable, "-m", "workers", "base-image", "publish", "--rootfs-tar", str(infra.rootfs_tar)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tag = f"py3.11-{datetime.now(UTC):%Y%m%d}"
    assert f"{infra.registry}/mms/inference-base:{tag}" in done.stderr
    tags = httpx.get(f"http://{infra.registry}/v2/mms/inference-base/tags/list", timeout=10).json()["tags"]
    assert {tag, "py3.11", "latest"} <= set(tags)


def test_an_unknown_release_or_a_spark_base_of_another_release_is_refused_at_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    env["MMS_DATA_DIR"] = str(tmp_path)
    for args, said in [
        (["--release", "sid"], "--release must be one of bullseye, bookworm, trixie, not 'sid'"),
        (["--variant", "spark", "--release", "trixie"], "--variant spark is built on bookworm only"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "workers", "base-image", "publish", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and said in done.stderr, done.stderr
