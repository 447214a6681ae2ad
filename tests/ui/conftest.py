"""Fixtures for the dashboard tests: Debian's Chromium driven by Playwright (never a browser
download), and the service as the README runs it (`mms serve` with its own build worker)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.embedded_service import EmbeddedService, stop

CHROMIUM = Path("/usr/bin/chromium")
BASE_ROOTFS = Path(__file__).resolve().parents[2] / "scripts" / "infra" / "base-rootfs.sh"

# Every state a row's CreationState cell shows, in order, per image id: a build can pass
# through Running faster than a test polls, so the page's own DOM changes are recorded.
STATE_HISTORY = """
(() => {
  window.__stateHistory = {};
  const note = (id, state) => {
    if (!id || !state) return;
    const seen = (window.__stateHistory[id] ||= []);
    if (seen[seen.length - 1] !== state) seen.push(state);
  };
  const rowOf = (node) => node.closest && node.closest("tr[data-image-id]");
  new MutationObserver((records) => {
    for (const record of records) {
      // The value before each change: the first one after a row appeared is the state it showed.
      if (record.type === "attributes") note(rowOf(record.target)?.dataset.imageId, record.oldValue);
    }
    for (const cell of document.querySelectorAll("tr[data-image-id] [data-state]")) {
      note(rowOf(cell).dataset.imageId, cell.dataset.state);
    }
  }).observe(document, {subtree: true, childList: true, attributes: true,
                        attributeFilter: ["data-state"], attributeOldValue: true});
})();
"""


@pytest.fixture(scope="session")
def rootfs_tar() -> Path:
    """The Debian root file system the service publishes as its base image (built once, cached)."""
    if os.geteuid() != 0:
        pytest.skip("the base root file system needs root (debootstrap)")
    made = subprocess.run([str(BASE_ROOTFS)], capture_output=True, text=True, timeout=900, check=False)
    assert made.returncode == 0, made.stderr[-2000:]
    return Path(made.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def service(rootfs_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    # No smoke test, whether or not an engine runs: the page shows that it was skipped, and why.
    embedded = EmbeddedService.prepare(
        tmp_path_factory.mktemp("ui-data"), tmp_path_factory.mktemp("ui-logs"), rootfs_tar, MMS_SMOKE_TEST="off"
    )
    server = embedded.serve()
    try:
        yield embedded
    finally:
        stop(server)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"needs Debian's Chromium at {CHROMIUM} (scripts/test installs it)")
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser) -> Iterator[object]:
    """A fresh browser profile with the state recorder, failing the test on a script error or
    a Content-Security-Policy violation."""
    context = browser.new_context()
    context.set_default_timeout(20_000)
    tab = context.new_page()
    tab.add_init_script(STATE_HISTORY)
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    tab.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    try:
        yield tab
    finally:
        context.close()
    assert not problems, problems
