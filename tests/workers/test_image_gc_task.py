"""The workers' beat collects the embedded image store's garbage on a schedule."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from app.config import Settings
from app.image_store import image_layout
from tests.image_store.test_oci_layout import build_image


def test_the_beat_schedules_the_collection_and_the_task_collects(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.tasks
    from workers.celery_app import COLLECT_TASK, celery_app

    entry = celery_app.conf.beat_schedule["collect-image-garbage"]
    assert entry["task"] == COLLECT_TASK and entry["schedule"] == settings.image_gc_interval_seconds
    assert COLLECT_TASK in celery_app.tasks

    embedded = settings.model_copy(update={"data_dir": tmp_path, "registry": None, "image_gc_grace_seconds": 3600})
    layout = image_layout(embedded)
    gone = build_image(layout, "acct/gone", "1", {"a": b"deleted"})
    young = layout.put_blob_bytes(b"a build's layer, its manifest not yet in")
    layout.delete_tag("acct/gone", "1")
    then = time.time() - 7200
    for path in layout.root.rglob("*"):
        if path.is_file() and not path.name.endswith(young[7:]):
            os.utime(path, (then, then))
    monkeypatch.setattr(workers.tasks, "settings", embedded)

    celery_app.tasks[COLLECT_TASK].apply().get()

    assert layout.has_blob(gone.layer_digest) is None
    assert layout.has_blob(young) is not None
