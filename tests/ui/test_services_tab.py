"""The dashboard's Services tab (web services preview) in a real browser (Debian's Chromium)
against the app on a real uvicorn and the test database: services made through the API, moved
as the reconciler moves them (no deploy worker runs: nothing deploys them); the tab lists them
with their state, scoring URI, replicas, image and compute, follows a change by polling with
If-None-Match, renders what a tenant controls as text only, never shows a key, and is absent
where the preview is off."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Locator, Page, Request, Response, expect
from sqlalchemy import select, update

from app.context import ServiceContext
from app.database import session_scope
from app.deployments.states import ServiceState
from app.deployments.transitions import Transition, move
from app.orm import Account, Image, Manifest, Service, ServiceLogLine
from app.orm.base import utcnow
from app.services.principals import create_service_principal
from tests.live_server import Live, live_service

# Tenant text carrying markup: rendered as text, nothing may run or load. (The API refuses
# such a service name; the name is written straight to the row, so the page must not trust it.)
XSS = '<img src=x onerror="window.__xss=1">'
XSS_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture()
def preview(service_context: ServiceContext, data_dir: Path) -> Iterator[Live]:
    with live_service(service_context, data_dir, web_services_preview=True) as live:
        yield live


@pytest.fixture()
def preview_off(service_context: ServiceContext, data_dir: Path) -> Iterator[Live]:
    with live_service(service_context, data_dir, web_services_preview=False) as live:
        yield live


def _sign_in(page: Page, live: Live, account_url: str) -> None:
    """As a service principal (an Owner of the subscription), then pick the account."""
    with session_scope(live.context.session_factory) as session:
        principal, secret = create_service_principal(
            session,
            issuer=live.context.settings.issuer,
            display_name="ui-services",
            role="Owner",
            scope="/subscriptions/sub-live",
            created_by=None,
        )
        client_id = principal.client_id
    live.principals.append(client_id)
    page.goto(f"{live.base}/ui/")
    page.get_by_label("Client id").fill(client_id)
    page.get_by_label("Client secret").fill(secret)
    page.get_by_role("button", name="Sign in").click()
    account = account_url.rsplit("/", 1)[1]
    page.get_by_role("button", name=re.compile(rf"^{account}\b")).click()
    expect(page.get_by_role("tab", name="Images")).to_have_attribute("aria-selected", "true")


def _succeeded_image(live: Live, account_url: str) -> str:
    """A Succeeded image in the account, as a build worker leaves one (no build runs here)."""
    name = account_url.rsplit("/", 1)[1]
    with session_scope(live.context.session_factory) as session:
        account = session.scalars(
            select(Account).where(Account.resource_group == "rg-live", Account.name == name)
        ).one()
        manifest = Manifest(
            account_id=account.id,
            name="m",
            version=1,
            driver_program="score",
            model_type="Registered",
            runtime_type="Python",
            webservice_type="Realtime",
        )
        session.add(manifest)
        session.flush()
        image = Image(
            account_id=account.id,
            manifest_id=manifest.id,
            name="scorer",
            version=1,
            image_type="Docker",
            builder="docker",
            state="Succeeded",
            published_at=utcnow(),
        )
        session.add(image)
        session.flush()
        return str(image.id)


def _create(live: Live, account_url: str, name: str, image_id: str, **body: object) -> dict:
    created = httpx.post(
        f"{account_url}/services", json={"name": name, "imageId": image_id, **body}, headers=live.headers
    )
    assert created.status_code == 202, created.text
    return created.json()


def _move(live: Live, service_id: str, transition: Transition, to: ServiceState, **values: object) -> None:
    """What the reconciler writes when the orchestrator reports."""
    with session_scope(live.context.session_factory) as session:
        assert move(session, transition, Service.id == uuid.UUID(service_id), to=to, **values)


def _row(page: Page, service_id: str) -> Locator:
    return page.locator(f'tr[data-service-id="{service_id}"]')


def _fact(page: Page, term: str) -> Locator:
    """The detail view's value for ``term``."""
    return page.locator("#service-facts dt", has_text=re.compile(rf"^{term}$")).locator(
        "xpath=following-sibling::dd[1]"
    )


def test_the_services_tab_lists_services_follows_a_change_and_runs_no_tenant_markup(page: Page, preview: Live) -> None:
    live = preview
    account = live.account()
    image_id = _succeeded_image(live, account)
    healthy = _create(live, account, "healthy-svc", image_id)
    pending = _create(live, account, "pending-svc", image_id, description=XSS)
    broken = _create(live, account, "broken-svc", image_id)
    _move(live, healthy["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    _move(live, broken["id"], Transition.FAIL, ServiceState.FAILED, error=f"the replica exited: {XSS}")
    with session_scope(live.context.session_factory) as session:
        session.execute(update(Service).where(Service.id == uuid.UUID(broken["id"])).values(name=XSS_NAME))
        session.add_all(
            ServiceLogLine(
                service_id=uuid.UUID(broken["id"]), generation=1, replica_id="r" * 16, logged_ns=n, text=text
            )
            for n, text in enumerate(["init() started", f"printed by run(): {XSS}"])
        )
    scoring_uri = httpx.get(f"{account}/services/{healthy['id']}", headers=live.headers).json()["scoringUri"]
    assert scoring_uri and scoring_uri.endswith(f"/api/v1/service/{healthy['id']}/score")
    keys = httpx.post(f"{account}/services/{healthy['id']}/keys", headers=live.headers).json()

    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url))
    list_answers: list[tuple[int, str | None]] = []

    def note(response: Response) -> None:
        if response.url.split("?")[0].endswith("/services"):
            list_answers.append((response.status, response.request.headers.get("if-none-match")))

    page.on("response", note)
    _sign_in(page, live, account)
    page.evaluate("window.__notReloaded = true")
    page.get_by_role("tab", name="Services").click()
    expect(page.get_by_role("tab", name="Services")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#services-body tr")).to_have_count(3)

    row = _row(page, healthy["id"])
    expect(row.locator(".state")).to_have_text("Healthy")
    expect(row.locator(".state")).to_have_attribute("data-state", "Healthy")
    expect(row.locator(".uri code")).to_have_text(scoring_uri)
    expect(row.locator("td").nth(3)).to_have_text("1/1")
    expect(row.locator("td").nth(4)).to_have_text("scorer:1")
    expect(row.locator("td").nth(5)).to_have_text("local (local)")
    row.get_by_role("button", name="Copy the scoring URI of healthy-svc").click()
    expect(row.get_by_role("button", name="Copy the scoring URI of healthy-svc")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == scoring_uri

    waiting = _row(page, pending["id"])
    expect(waiting.locator(".state")).to_have_text("Transitioning")
    expect(waiting.locator("td").nth(2)).to_have_text("not serving yet")
    expect(waiting.locator("td").nth(3)).to_have_text("0/1")

    failed = _row(page, broken["id"])
    expect(failed.locator(".open-service")).to_have_text(XSS_NAME)
    expect(failed.locator(".state")).to_have_attribute("data-state", "Failed")
    expect(failed.locator(".service-error")).to_have_text(f"DeploymentFailed: the replica exited: {XSS}")

    # Polled with the list's ETag: unchanged, a bodiless 304.
    if not any(status == 304 and tag for status, tag in list_answers):
        page.wait_for_event("response", lambda r: r.url.endswith("/services") and r.status == 304, timeout=15_000)
    # The reconciler brings the pending service up: the next poll shows it, without a reload.
    _move(live, pending["id"], Transition.CONVERGE, ServiceState.HEALTHY, traffic_generation=1, replicas_ready=1)
    expect(waiting.locator(".state")).to_have_text("Healthy", timeout=15_000)
    expect(waiting.locator(".uri code")).to_have_text(re.compile(rf"/api/v1/service/{pending['id']}/score$"))
    expect(waiting.locator("td").nth(3)).to_have_text("1/1")
    assert page.evaluate("window.__notReloaded") is True
    assert list_answers[-1][0] == 200 and list_answers[-1][1], list_answers

    # The detail view: the error, the operation as the API has it, and the recent logs, all as text.
    failed.locator(".open-service").click()
    expect(page.locator("#service-title")).to_have_text(f"Service: {XSS_NAME}")
    logs = page.locator("#service-logs")
    expect(logs).to_have_text(f"g1 rrrrrrrrrrrr init() started\ng1 rrrrrrrrrrrr printed by run(): {XSS}\n")
    expect(page.locator("#service-status")).to_have_text("2 recent log lines (200 at most)")
    expect(_fact(page, "State")).to_have_text(f"Failed DeploymentFailed: the replica exited: {XSS}")
    operation = httpx.get(f"{account}/operations/{broken['operationId']}", headers=live.headers).json()
    expect(_fact(page, "Operation")).to_have_text(operation["state"])
    expect(_fact(page, "Key auth")).to_have_text("on (keys are not shown here)")
    waiting.locator(".open-service").click()
    expect(page.locator("#service-title")).to_have_text("Service: pending-svc")
    expect(_fact(page, "Description")).to_have_text(XSS)
    expect(_fact(page, "Scoring URI").locator("code")).to_have_text(re.compile(rf"{pending['id']}/score$"))

    assert page.locator("img").count() == 0
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    assert not [url for url in asked if url.endswith("/x")], asked
    # Keys are never asked for, nor shown.
    assert not [url for url in asked if "/keys" in url or "regenerateKeys" in url]
    content = page.content()
    assert keys["primaryKey"] not in content and keys["secondaryKey"] not in content

    # The image links to its build log on the Images tab.
    row.get_by_role("button", name="Open the build log of image scorer:1").click()
    expect(page.get_by_role("tab", name="Images")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#log-title")).to_have_text("Build log: scorer:1")


def test_the_services_tab_is_absent_where_the_preview_is_off(page: Page, preview_off: Live) -> None:
    live = preview_off
    account = live.account()
    probed: list[Request] = []
    page.on("request", lambda request: probed.append(request) if request.url.endswith("/services") else None)
    with page.expect_response(lambda r: r.url.endswith("/services")) as answer:
        _sign_in(page, live, account)
    assert answer.value.status == 404 and answer.value.json()["code"] == "NotFound"
    page.wait_for_timeout(4000)  # longer than a poll: the tab stays hidden, nothing asks for the list again
    expect(page.locator("#tab-services")).to_be_hidden()
    expect(page.locator("#panel-services")).to_be_hidden()
    assert len(probed) == 1
    # Arrow keys go round the tabs that are there: from Images back to Manifests.
    page.get_by_role("tab", name="Images").press("ArrowLeft")
    expect(page.get_by_role("tab", name="Manifests")).to_have_attribute("aria-selected", "true")
