"""What a failed build tells the tenant: an unexpected error gets a short message and an error id
(the traceback goes to the service's own log under the same id); a refused fetch names the host
the tenant gave and the kind of address, never the address."""

from __future__ import annotations

import logging
import re
import socket

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.builds.states import SmokeTestResult
from app.context import ServiceContext
from app.orm import BuildLogChunk, Image
from tests.factories import new_image_row
from workers import pipeline, runner
from workers.builders import BuildResult
from workers.pipeline import StepFailed, smoke_engine

INTERNAL = "connection to postgresql://mms:hunter2@10.0.0.7/mms refused in /opt/mms/lib/pipeline.py"


@pytest.fixture()
def image(db: Session) -> Image:
    # Its asset resolves to this machine's loopback, which no allow list of the tests names.
    score = {
        "asset_id": "score",
        "mime_type": "text/x-python",
        "url": "http://localhost:9/score.py?sig=tenant-sas",
        "unpack": False,
    }
    return new_image_row(db, builder="oci", assets=[score])


def _log(db: Session, image: Image) -> str:
    return "".join(
        db.scalars(select(BuildLogChunk.text).where(BuildLogChunk.image_id == image.id).order_by(BuildLogChunk.seq))
    )


def test_an_unexpected_error_shows_the_tenant_an_error_id_and_logs_the_traceback_under_it(
    app_context: ServiceContext,
    db: Session,
    image: Image,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def crash(*_: object) -> None:  # a bug deep in the pipeline, with internals in its message
        raise ConnectionError(INTERNAL)

    monkeypatch.setattr(runner, "run_pipeline", crash)
    with caplog.at_level(logging.ERROR, logger="mms.worker"):
        runner.run_build(app_context, str(image.id))

    db.refresh(image)
    log = _log(db, image)
    assert image.state == "Failed"
    error_id = re.search(r"error id ([0-9a-f]{16})", image.error)[1]  # type: ignore[index]
    assert f"error id {error_id}" in log
    for tenant_sees in (log, image.error):
        assert "Traceback" not in tenant_sees and "hunter2" not in tenant_sees
        assert "ConnectionError" not in tenant_sees and "pipeline.py" not in tenant_sees

    [record] = [r for r in caplog.records if r.getMessage() == "worker.build_crashed"]
    assert record.errorId == error_id and record.imageId == str(image.id)  # type: ignore[attr-defined]
    text = logging.Formatter().format(record)
    assert "Traceback" in text and INTERNAL in text and f"error id {error_id}" in text


def test_a_fetch_refused_at_a_private_address_names_the_host_never_the_address(
    app_context: ServiceContext, db: Session, image: Image
) -> None:
    runner.run_build(app_context, str(image.id))
    db.refresh(image)
    log = _log(db, image)
    assert image.state == "Failed"
    for tenant_sees in (log, image.error):
        assert "host localhost is at a loopback address" in tenant_sees, tenant_sees
        assert "127.0.0.1" not in tenant_sees and "::1" not in tenant_sees and "tenant-sas" not in tenant_sees


def test_the_smoke_tests_outcome_is_kept_on_the_image_and_shown_with_it(
    app_context: ServiceContext, db: Session, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    skipped = BuildResult(
        "127.0.0.1:5000/acct/img:1", "sha256:" + "a" * 64, 10, None, SmokeTestResult.SKIPPED, "no Docker engine: why"
    )
    monkeypatch.setattr(runner, "run_pipeline", lambda *_: skipped)
    runner.run_build(app_context, str(image.id))
    db.refresh(image)
    assert (image.state, image.smoke_test, image.smoke_test_reason) == ("Succeeded", "Skipped", "no Docker engine: why")


def test_a_failed_smoke_test_says_so_beside_the_error(
    app_context: ServiceContext, db: Session, image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails(*_: object) -> None:
        raise StepFailed("smoke test", "the scoring server exited with code 1: ValueError: bad model")

    monkeypatch.setattr(runner, "run_pipeline", fails)
    runner.run_build(app_context, str(image.id))
    db.refresh(image)
    assert (image.state, image.smoke_test) == ("Failed", "Failed")
    assert image.smoke_test_reason == "the scoring server exited with code 1: ValueError: bad model"


def test_where_no_engine_can_run_it_the_smoke_test_is_skipped_saying_why(
    app_context: ServiceContext, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    settings = app_context.settings.model_copy(update={"docker_host": None, "smoke_test": "auto"})
    monkeypatch.setattr(pipeline, "DEFAULT_DOCKER_SOCKET", str(tmp_path / "docker.sock"))
    assert smoke_engine(settings) == (None, f"no Docker engine: set DOCKER_HOST, or run one at {tmp_path}/docker.sock")
    with socket.socket(socket.AF_UNIX) as listening:  # a socket nobody answers on
        listening.bind(str(tmp_path / "docker.sock"))
        engine, why = smoke_engine(settings)
    assert engine is None and why.startswith(f"the Docker engine at {tmp_path}/docker.sock did not answer")
    off = settings.model_copy(update={"smoke_test": "off", "docker_host": "unix:///var/run/docker.sock"})
    assert smoke_engine(off) == (None, "turned off on this service (MMS_SMOKE_TEST=off)")
    named = settings.model_copy(update={"docker_host": "tcp://10.0.0.9:2376"})
    assert smoke_engine(named) == ("tcp://10.0.0.9:2376", None)

    # Required: a build with no engine to start its image fails instead.
    context = ServiceContext.build(
        settings.model_copy(update={"smoke_test": "required"}),
        engine=app_context.engine,
        session_factory=app_context.session_factory,
    )
    built = BuildResult("127.0.0.1:5000/acct/img:1", "sha256:" + "a" * 64, 10)
    with pytest.raises(StepFailed, match=r"did not answer .*; this service requires one \(MMS_SMOKE_TEST=required\)"):
        pipeline.smoke_step(context, None, built, pull=True, emit=lambda _: None)  # type: ignore[arg-type]
