"""/metrics: request latency by route template (added up across API processes) and build,
queue and webhook figures read from the database."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.orm import Image
from app.orm.base import utcnow
from tests.api.test_images import _create
from tests.embedded_service import free_port, wait_for


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_requests_builds_and_the_queue_are_measured(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, db: Session
) -> None:
    image = _create(client, account, owner, manifest_id).json()
    assert client.get(f"{account}/images/{image['Id']}", headers=owner).status_code == 200
    finished = Image(
        account_id=db.get(Image, uuid.UUID(image["Id"])).account_id,
        manifest_id=uuid.UUID(manifest_id),
        name="timed",
        version=1,
        image_type="Docker",
        builder="metrics-test",
        state="Succeeded",
        started_at=utcnow() - timedelta(seconds=45),
        ended_at=utcnow(),
    )
    db.add(finished)
    db.flush()

    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    samples = _samples(answer.text)
    route = "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}/images/{imageId}"
    assert (
        samples[
            (
                "mms_http_request_duration_seconds_count",
                frozenset({"method": "GET", "route": route, "status": "200"}.items()),
            )
        ]
        >= 1
    )
    waiting = db.scalar(select(func.count()).select_from(Image).where(Image.state == "NotStarted"))
    assert samples[("mms_builds", frozenset({"state": "NotStarted"}.items()))] == waiting >= 1
    assert samples[("mms_build_queue_depth", frozenset())] == waiting

    def bucket(le: str) -> float:
        return samples[
            (
                "mms_build_duration_seconds_bucket",
                frozenset({"builder": "metrics-test", "state": "Succeeded", "le": le}.items()),
            )
        ]

    assert (bucket("30.0"), bucket("60.0"), bucket("+Inf")) == (0, 1, 1)
    assert (
        44
        < samples[
            ("mms_build_duration_seconds_sum", frozenset({"builder": "metrics-test", "state": "Succeeded"}.items()))
        ]
        < 47
    )
    assert ("mms_webhook_deliveries", frozenset({"state": "Pending"}.items())) in samples
    assert "secret" not in answer.text.lower() and "Bearer" not in answer.text


def test_several_api_processes_report_every_request(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MMS_")},
        "MMS_DATA_DIR": str(tmp_path),
        "MMS_PORT": str(port),
        "MMS_WORKERS": "2",
        "MMS_LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--no-build-worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", server)
        with httpx.Client(base_url=base) as first:  # one connection: one process
            baseline = _samples(first.get("/metrics").text)
        key = (
            "mms_http_request_duration_seconds_count",
            frozenset({"method": "GET", "route": "/health", "status": "200"}.items()),
        )
        for _ in range(30):  # a connection each: spread over both processes
            assert httpx.get(f"{base}/health").status_code == 200
        counts = {_samples(httpx.get(f"{base}/metrics").text)[key] for _ in range(6)}
        assert counts == {baseline.get(key, 0) + 30}, counts
    finally:
        server.terminate()
        server.wait(timeout=30)
