"""`mms base-image publish --variant gpu`: Debian's CUDA runtime (non-free, read by the rootfs's
debootstrap only) on the minimal Python base, labelled with its CUDA version and recorded as the
gpu variant, into the service's own image store (no engine, no registry). The rootfs is built
once per machine and cached outside the clone (scripts/infra/gpu-rootfs.sh)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from app.config import Settings
from app.database import make_engine, make_session_factory, session_scope
from app.services.base_images import default_base_image, list_base_images
from tests.infra import run_script
from workers.base_image import cuda_version


def _blob(store: Path, digest: str) -> dict:
    return json.loads((store / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text())


def test_the_gpu_base_carries_debians_cuda_runtime_and_is_the_gpu_default(tmp_path: Path) -> None:
    _, tar = run_script("gpu-rootfs.sh")
    assert cuda_version(Path(tar)) == "11.8"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")} | {"MMS_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "workers", "base-image", "publish", "--variant", "gpu", "--rootfs-tar", tar],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "it is now the default base image of manifests with enableGpu" in done.stderr
    reference, digest = re.search(
        r"pushed (\S+/mms/inference-base:py3\.11-gpu-\d{8}) (sha256:[0-9a-f]{64})", done.stderr
    ).groups()
    store = tmp_path / "images"
    config = _blob(store, _blob(store, digest)["config"]["digest"])
    labels = config["config"]["Labels"]
    assert labels["org.mms.cuda"] == "11.8" and labels["org.mms.python"] == "3.11" and "org.mms.java" not in labels
    engine = make_engine(Settings(data_dir=tmp_path, secret_key="x" * 40))
    try:
        with session_scope(make_session_factory(engine)) as session:
            assert default_base_image(session, variant="gpu") == reference
            assert default_base_image(session) is None  # the CPU default is another image
            listed = {e.variant: e for e in list_base_images(session)}
            assert listed["gpu"].available and listed["gpu"].reference == reference
    finally:
        engine.dispose()


def test_a_rootfs_without_the_cuda_runtime_is_refused_as_the_gpu_variant(tmp_path: Path) -> None:
    _, tar = run_script("base-rootfs.sh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")} | {"MMS_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "workers", "base-image", "publish", "--variant", "gpu", "--rootfs-tar", tar],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0 and "has no CUDA runtime" in done.stderr and "gpu-rootfs.sh" in done.stderr
