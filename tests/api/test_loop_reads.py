"""The API's reads on the event loop (PostgreSQL, app.reads.LoopReads), with committed data: what
the routes' own tests check through the thread pool (their sessions join the test's transaction)
checked here once more the way production reads: errors raised in the read, what a resource
loads besides its row, pages, and an image poll answered 304 by the route."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.context import ServiceContext
from app.reads import LoopReads
from tests.factories import model_body
from tests.live_server import Live, live_service

pytestmark = pytest.mark.postgres_only


@pytest.fixture()
def live(service_context: ServiceContext, data_dir: Path) -> Iterator[Live]:
    with live_service(service_context, data_dir) as live:
        assert isinstance(live.context.reads, LoopReads)
        yield live


def test_a_missing_resource_is_a_404_in_the_service_s_error_shape(live: Live) -> None:
    account = live.account()
    for kind in ("models", "manifests", "images", "operations", "services", "webhooks"):
        answer = httpx.get(f"{account}/{kind}/{uuid.uuid4()}", headers=live.headers)
        assert answer.status_code == 404, (kind, answer.text)
        assert answer.json()["code"].endswith("NotFound") and answer.json()["statusCode"] == 404
    missing_account = account.rsplit("/", 1)[0] + "/no-such-account"
    answer = httpx.get(f"{missing_account}/models", headers=live.headers)
    assert answer.status_code == 404 and "no-such-account" in answer.json()["message"]


def test_a_manifest_and_an_image_load_what_they_hold(live: Live) -> None:
    account = live.account()
    image = live.image(account)
    got = httpx.get(f"{account}/images/{image['Id']}", headers=live.headers)
    assert got.status_code == 200, got.text
    manifest = got.json()["Manifest"]
    assert manifest["modelIds"] and manifest["driverProgram"], manifest
    by_id = httpx.get(f"{account}/manifests/{manifest['id']}", headers=live.headers).json()
    assert by_id["modelIds"] == manifest["modelIds"] and by_id["assets"], by_id
    # Polled through the route (roles are read each time here, so the memory shortcut stays out).
    again = httpx.get(f"{account}/images/{image['Id']}", headers={**live.headers, "If-None-Match": got.headers["etag"]})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == got.headers["etag"]


def test_pages_follow_their_next_link(live: Live) -> None:
    account = live.account()
    made = [httpx.post(f"{account}/models", json=model_body(), headers=live.headers).json() for _ in range(3)]
    seen, url = [], f"{account}/models?count=2"
    while url:
        page = httpx.get(url, headers=live.headers).json()
        seen += [model["id"] for model in page["value"]]
        url = page.get("nextLink")
    assert sorted(seen) == sorted(model["id"] for model in made)
