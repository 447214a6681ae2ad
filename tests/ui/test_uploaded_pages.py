"""A tenant's upload opened in a real browser (Debian's Chromium) from the API's own origin,
where the dashboard keeps its token: it is downloaded, and its script never runs there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page

from app.context import ServiceContext
from tests.live_server import Live, live_service

# Each would mark the origin's storage if it ran as a page of the API's origin.
PAGES = {
    "page.html": ("text/html", b"<html><body><script>localStorage.setItem('ran', 'page.html')</script></body></html>"),
    "image.svg": (
        "image/svg+xml",
        b"<svg xmlns=\"http://www.w3.org/2000/svg\"><script>localStorage.setItem('ran', 'image.svg')</script></svg>",
    ),
    "notes.txt": ("text/plain", b"<html><script>localStorage.setItem('ran', 'notes.txt')</script></html>"),
}


@pytest.fixture()
def live(service_context: ServiceContext, tmp_path: Path) -> Iterator[Live]:
    with live_service(service_context, tmp_path) as live:
        yield live


@pytest.mark.parametrize("name", sorted(PAGES))
def test_an_uploaded_page_opened_in_a_browser_is_downloaded_and_runs_nothing(live: Live, page: Page, name: str) -> None:
    content_type, data = PAGES[name]
    account = live.account()
    uploaded = httpx.post(
        f"{account}/assets", params={"name": name}, content=data, headers={**live.headers, "Content-Type": content_type}
    )
    assert uploaded.status_code == 201, uploaded.text
    with page.expect_download() as download:
        try:
            page.goto(uploaded.json()["url"])
        except PlaywrightError as exc:  # a navigation that turns into a download is aborted
            assert "Download is starting" in str(exc) or "ERR_ABORTED" in str(exc), exc
    assert download.value.suggested_filename == name
    page.goto(f"{live.base}/health")  # the same origin: the script would have marked its storage
    assert page.evaluate("localStorage.getItem('ran')") is None
