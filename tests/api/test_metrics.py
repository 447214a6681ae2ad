"""/metrics: request latency by route template (added up across API processes) and build,
queue and webhook figures read from the database; build durations counted as builds end."""

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
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.builds.leases import claim_build, finish_build
from app.builds.states import CreationState
from app.context import ServiceContext
from app.metrics import DatabaseCollector
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


def _build(
    client: TestClient, account: str, owner: dict[str, str], manifest_id: str, db: Session, **finish: object
) -> str:
    """A build run to its end the way a worker runs it: claimed, then finished by app.builds;
    ``finish`` has its ``builder``, ``seconds`` and final ``state``."""
    image_id = uuid.UUID(_create(client, account, owner, manifest_id, name="timed").json()["Id"])
    lease = claim_build(db, image_id, owner="metrics-test-worker", lease_seconds=60, max_attempts=3)
    assert lease is not None
    started = utcnow() - timedelta(seconds=float(finish["seconds"]))  # type: ignore[arg-type]
    db.execute(update(Image).where(Image.id == image_id).values(started_at=started, builder=finish["builder"]))
    assert finish_build(db, lease, state=finish["state"])  # type: ignore[arg-type]
    return str(image_id)


def test_requests_builds_and_the_queue_are_measured(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, db: Session
) -> None:
    image = _create(client, account, owner, manifest_id).json()
    assert client.get(f"{account}/images/{image['Id']}", headers=owner).status_code == 200
    _build(client, account, owner, manifest_id, db, builder="metrics-test", seconds=45, state=CreationState.SUCCEEDED)

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
    # No secret anywhere (the rotateSecret route's template names the word, not a secret).
    assert "secret" not in answer.text.lower().replace("/rotatesecret", "") and "Bearer" not in answer.text


def test_build_durations_never_fall_when_images_are_deleted(
    client: TestClient, owner: dict[str, str], account: str, manifest_id: str, db: Session, app_context: ServiceContext
) -> None:
    client.app.state.metrics = DatabaseCollector(
        app_context.read_session_factory, cache_seconds=0
    )  # every scrape reads
    builder = f"mt-{uuid.uuid4().hex[:8]}"
    finished = [
        _build(client, account, owner, manifest_id, db, builder=builder, seconds=s, state=CreationState.SUCCEEDED)
        for s in (5, 100)
    ]
    _build(client, account, owner, manifest_id, db, builder=builder, seconds=20, state=CreationState.FAILED)
    succeeded, failed = (frozenset({"builder": builder, "state": state}.items()) for state in ("Succeeded", "Failed"))

    def durations() -> dict[tuple[str, frozenset], float]:
        samples = _samples(client.get("/metrics").text)
        return {key: value for key, value in samples.items() if key[0].startswith("mms_build_duration_seconds")}

    before = durations()
    assert before[("mms_build_duration_seconds_count", succeeded)] == 2
    assert 104 < before[("mms_build_duration_seconds_sum", succeeded)] < 107
    assert before[("mms_build_duration_seconds_bucket", succeeded | {("le", "10.0")})] == 1
    assert before[("mms_build_duration_seconds_bucket", succeeded | {("le", "60.0")})] == 1
    assert before[("mms_build_duration_seconds_bucket", succeeded | {("le", "120.0")})] == 2
    assert before[("mms_build_duration_seconds_count", failed)] == 1

    for image_id in finished:
        assert client.delete(f"{account}/images/{image_id}", headers=owner).status_code == 204
    assert client.get(f"{account}/images/{finished[0]}", headers=owner).status_code == 404
    assert durations() == before  # deleted images take nothing away
    assert client.delete(f"{account}?force=true", headers=owner).status_code == 204  # nor does their account
    assert durations() == before


def test_route_labels_are_templates_for_registry_paths_and_one_label_for_unknown_paths(client: TestClient) -> None:
    for path in ("/v2/acct-a/model-one/manifests/1", "/v2/acct-b/model-two/manifests/latest", "/v2/a/b/blobs/sha256:0"):
        assert client.get(path).status_code == 401  # no token: the challenge
    for path in ("/no/such/path", f"/no/such/{uuid.uuid4()}", "/api/nothing-here"):
        assert client.get(path).status_code == 404
    routes = {
        dict(labels)["route"]
        for name, labels in _samples(client.get("/metrics").text)
        if name == "mms_http_request_duration_seconds_count"
    }
    assert {"/v2/{name}/manifests/{reference}", "/v2/{name}/blobs/{digest}", "<unmatched>"} <= routes
    assert not [route for route in routes if "acct-" in route or "/no/such" in route or ":path}" in route], routes


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
