"""enableGpu never builds a CPU image: without a baseImage the build takes the newest published
gpu base, and with none published it fails naming enableGpu before it fetches anything."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.orm import BuildLogChunk, Image
from app.services.base_images import record_base_image
from tests.factories import new_image_row
from workers import runner
from workers.build_context import BuildSpec, write_context
from workers.pipeline import build_base, load_inputs

CPU_BASE = "127.0.0.1:5000/mms/inference-base:py3.11-20300101"
GPU_BASE = "127.0.0.1:5000/mms/inference-base:py3.11-gpu-20300101"


def _gpu_image(db: Session, *, base_image: str | None = None) -> Image:
    # Nothing listens at its asset's address: a build that got as far as fetching would say so.
    score = {"asset_id": "score", "mime_type": "text/x-python", "url": "http://localhost:9/score.py", "unpack": False}
    image = new_image_row(db, builder="oci", assets=[score])
    image.manifest.enable_gpu, image.manifest.base_image = True, base_image
    db.flush()
    return image


def test_a_gpu_build_with_no_gpu_base_published_fails_naming_enable_gpu(app_context: ServiceContext, db: Session):
    record_base_image(db, reference=CPU_BASE, python_version="3.11")  # a CPU base does not do
    image = _gpu_image(db)
    runner.run_build(app_context, str(image.id))
    db.refresh(image)
    log = "".join(db.scalars(select(BuildLogChunk.text).where(BuildLogChunk.image_id == image.id)))
    assert image.state == "Failed" and image.image_location is None
    assert re.search(
        r"enableGpu: no GPU base image is published: publish one with `mms base-image publish "
        r"--variant gpu`",
        image.error,
    ), image.error
    assert "enableGpu" in log and "fetching" not in log


def test_the_newest_gpu_base_is_the_from_of_a_gpu_build_and_the_image_is_labelled(
    app_context: ServiceContext, db: Session, tmp_path
) -> None:
    record_base_image(db, reference=CPU_BASE, python_version="3.11")
    record_base_image(db, reference=GPU_BASE, python_version="3.11", variant="gpu")
    image = _gpu_image(db)
    inputs = load_inputs(app_context, image.id)
    # Not MMS_DEFAULT_BASE_IMAGE either: that is a plain Python base.
    settings = app_context.settings.model_copy(update={"default_base_image": "127.0.0.1:5000/mms/plain:1"})
    assert build_base(settings, inputs) == GPU_BASE
    assert inputs.labels["org.mms.gpu"] == "true"
    app = tmp_path / "app"
    app.mkdir()
    (app / "score.py").write_text("def init(): pass\ndef run(d): return d\n")
    spec = BuildSpec(
        base_image=build_base(settings, inputs), driver_program="score.py", app_dir=app, labels=inputs.labels
    )
    dockerfile = write_context(spec, tmp_path / "context.tar").dockerfile.splitlines()
    assert dockerfile[0] == f"FROM {GPU_BASE}"
    assert any(line.startswith("LABEL ") and '"org.mms.gpu"="true"' in line for line in dockerfile)


def test_a_gpu_build_on_the_tenants_own_base_is_accepted_and_labelled(app_context: ServiceContext, db: Session):
    image = _gpu_image(db, base_image="myregistry.azurecr.io/cuda-py:12")
    inputs = load_inputs(app_context, image.id)
    assert build_base(app_context.settings, inputs) == "myregistry.azurecr.io/cuda-py:12"
    assert inputs.labels["org.mms.gpu"] == "true"
