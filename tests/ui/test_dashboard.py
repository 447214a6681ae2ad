"""The web dashboard in a real browser (Debian's Chromium) against a live service with its own
build worker: sign in as a service principal, pick the account, watch a build the API started
go Running then Succeeded without a reload, follow its log, list models and manifests, sign
out; and the ways signing in goes wrong."""

from __future__ import annotations

import dataclasses
import io
import re
import subprocess
import uuid
import zipfile
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.embedded_service import EmbeddedService, free_port, stop

BUILD_SECONDS = 600
SUBSCRIPTION, RESOURCE_GROUP = "ui-sub", "rg1"
ECHO_SCORE = "def init():\n    pass\n\ndef run(raw_data):\n    return {'echo': raw_data}\n"


class Api:
    """The HTTP API as a script uses it, for what the test sets up behind the page's back."""

    def __init__(self, service: EmbeddedService, account: str, resource_group: str = RESOURCE_GROUP) -> None:
        self.name = account
        self.url = f"{service.url}/api/subscriptions/{SUBSCRIPTION}/resourceGroups/{resource_group}/accounts/{account}"
        self.headers = {"Authorization": f"Bearer {service.token()}"}

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        response = httpx.request(method, f"{self.url}{path}", headers=self.headers, timeout=60, **kwargs)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text}"
        return response

    def upload(self, name: str, data: bytes) -> str:
        return self.call("POST", "/assets", params={"name": name}, content=data).json()["url"]


def _new_account(service: EmbeddedService) -> tuple[str, Api]:
    name = f"ui-{uuid.uuid4().hex[:8]}"
    api = Api(service, name)
    api.call("PUT", "", json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}})
    return name, api


def _sign_in(page: Page, service: EmbeddedService, secret: str | None = None) -> None:
    page.goto(f"{service.url}/ui")
    page.get_by_label("Client id").fill(service.client_id)
    page.get_by_label("Client secret").fill(secret or service.client_secret)
    page.get_by_role("button", name="Sign in").click()


def _pick_account(page: Page, account: str) -> None:
    """Straight after sign-in the picker lists every account the caller may read: no typing."""
    expect(page.get_by_role("heading", name="Pick an account")).to_be_visible()
    page.get_by_role("button", name=re.compile(rf"^{account}\b")).click()
    expect(page.get_by_role("tab", name="Images")).to_have_attribute("aria-selected", "true")


def _secrets_not_exposed(page: Page, *secrets: str) -> None:
    content = page.content()
    stored = page.evaluate("JSON.stringify([Object.entries(localStorage), document.cookie, location.href])")
    for secret in secrets:
        assert secret not in content and secret not in stored


def test_a_build_started_through_the_api_goes_running_then_succeeded_on_the_page(
    page: Page, service: EmbeddedService
) -> None:
    account, api = _new_account(service)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("weights.txt", "1 2 3\n")
    model_url = api.upload("model.zip", archive.getvalue())
    model = {"name": "ui.model", "tags": ["ui", "e2e"], "url": model_url, "mimeType": "application/zip", "unpack": True}
    api.call("POST", "/models", json=model)
    model_id = api.call("POST", "/models", json=model).json()["id"]  # version 2
    manifest_id = api.call(
        "POST",
        "/manifests",
        json={
            "name": "ui-manifest",
            "modelIds": [model_id],
            "entryScript": "score.py",
            "runtime": "python",
            "assets": [{"id": "score.py", "url": api.upload("score.py", ECHO_SCORE.encode())}],
        },
    ).json()["id"]

    log_answers: list[int] = []
    page.on("response", lambda r: log_answers.append(r.status) if r.url.endswith("/log") else None)
    _sign_in(page, service)
    _pick_account(page, account)
    # Listening before the build starts (the list came after the stream's `ready`).
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.get_by_text("No images yet.")).to_be_visible()
    page.evaluate("window.__notReloaded = true")

    created = api.call(
        "POST", "/images", json={"name": "ui-image", "manifestId": manifest_id, "imageType": "Docker"}
    ).json()
    image_id = created["Id"]
    row = page.locator(f'tr[data-image-id="{image_id}"]')
    expect(row).to_be_visible()
    row.get_by_role("button", name=re.compile("Open the build log of ui-image")).click()
    expect(page.locator("#log-title")).to_have_text("Build log: ui-image:1")

    expect(row.locator(".state")).to_have_text(re.compile("Succeeded|Failed|Cancelled"), timeout=BUILD_SECONDS * 1000)
    final = api.call("GET", f"/images/{image_id}").json()
    full_log = api.call("GET", f"/images/{image_id}/log").text
    assert final["CreationState"] == "Succeeded", full_log[-3000:]
    assert page.evaluate("window.__notReloaded") is True
    history = page.evaluate(f"window.__stateHistory[{image_id!r}]")
    assert history[-2:] == ["Running", "Succeeded"], history
    assert set(history) <= {"NotStarted", "Running", "Succeeded"}, history
    expect(row.locator("td").nth(1)).to_have_text("1")
    expect(row.locator("td").nth(4)).to_have_text(final["ImageLocation"])
    assert final["SmokeTest"] == {"result": "Skipped", "reason": "turned off on this service (MMS_SMOKE_TEST=off)"}
    expect(row.locator(".smoke-test")).to_have_text(
        "Smoke test skipped: turned off on this service (MMS_SMOKE_TEST=off)"
    )
    expect(row.locator("time")).to_have_attribute("datetime", re.compile(r"^\d{4}-"))

    # The log was followed while it grew and, once final, holds the whole log exactly once.
    expect(page.locator("#log-status")).to_have_text("Succeeded: complete")
    assert "with the oci builder" in full_log
    assert page.locator("#log-text").text_content() == full_log
    # Never the whole log again: only what was new (206), or nothing new (416).
    assert log_answers and set(log_answers) <= {206, 416}, log_answers

    page.get_by_role("tab", name="Models").click()
    models = page.locator("#models-body tr")
    expect(models).to_have_count(2)
    expect(models.nth(0)).to_contain_text("ui.model")
    assert [models.nth(i).locator("td").nth(1).text_content() for i in range(2)] == ["2", "1"]
    expect(models.nth(0).locator("td").nth(2)).to_have_text("ui, e2e")
    page.get_by_role("tab", name="Manifests").click()
    manifests = page.locator("#manifests-body tr")
    expect(manifests).to_have_count(1)
    expect(manifests.nth(0).locator("td").nth(0)).to_have_text("ui-manifest")
    expect(manifests.nth(0).locator("td").nth(1)).to_have_text("1")

    token = page.evaluate("JSON.parse(sessionStorage.getItem('mms.session')).token")
    _secrets_not_exposed(page, service.client_secret, token)
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Signed out.")).to_be_visible()
    expect(page.locator("#dashboard-view")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('mms.session')") is None
    assert page.get_by_label("Client secret").input_value() == ""


def test_the_picker_lists_every_account_at_once_and_a_resource_group_narrows_it(
    page: Page, service: EmbeddedService
) -> None:
    account, _ = _new_account(service)
    elsewhere = Api(service, f"ui-{uuid.uuid4().hex[:8]}", resource_group="rg-elsewhere")
    elsewhere.call("PUT", "", json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}})
    _sign_in(page, service)
    expect(page.get_by_role("heading", name="Pick an account")).to_be_visible()
    accounts = page.get_by_role("list", name="Accounts")
    expect(accounts.get_by_role("button", name=re.compile(rf"^{account}\b"))).to_contain_text(
        f"{SUBSCRIPTION} / {RESOURCE_GROUP}"
    )
    expect(accounts.get_by_role("button", name=re.compile(rf"^{elsewhere.name}\b"))).to_be_visible()
    # Half a place is refused; a whole one lists that resource group's only.
    page.get_by_label("Subscription id").fill(SUBSCRIPTION)
    page.get_by_role("button", name="List accounts").click()
    expect(page.get_by_role("alert")).to_contain_text("or neither")
    page.get_by_label("Resource group").fill(RESOURCE_GROUP)
    page.get_by_role("button", name="List accounts").click()
    expect(accounts.get_by_role("button", name=re.compile(rf"^{account}\b"))).to_be_visible()
    expect(accounts.get_by_role("button", name=re.compile(rf"^{elsewhere.name}\b"))).to_have_count(0)
    accounts.get_by_role("button", name=re.compile(rf"^{account}\b")).click()
    expect(page.locator("#who-account")).to_have_text(f"{SUBSCRIPTION} / {RESOURCE_GROUP} / {account}")


def test_a_wrong_secret_shows_the_services_message_and_never_the_secret(page: Page, service: EmbeddedService) -> None:
    wrong = "not-the-secret-" + uuid.uuid4().hex
    _sign_in(page, service, secret=wrong)
    expect(page.get_by_role("alert")).to_have_text(re.compile("Sign-in failed: the client id or secret is wrong"))
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    assert page.get_by_label("Client secret").input_value() == ""
    assert page.evaluate("sessionStorage.getItem('mms.session')") is None
    _secrets_not_exposed(page, wrong)


def test_an_invalid_token_sends_the_user_back_to_sign_in(page: Page, service: EmbeddedService) -> None:
    page.goto(f"{service.url}/ui/")
    page.get_by_label("an access token").check()
    page.get_by_label("Access token", exact=True).fill("not.a.token")
    page.get_by_role("button", name="Sign in").click()
    # The picker lists the accounts at once: the service's 401 sends the user back.
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("no longer accepts your sign-in")
    expect(page.get_by_role("alert")).to_contain_text("Sign in again")
    assert page.evaluate("sessionStorage.getItem('mms.session')") is None


@pytest.fixture()
def short_lived(service: EmbeddedService) -> Iterator[EmbeddedService]:
    """A second API process on the same data whose tokens last the shortest time allowed, a
    minute, with no clock leeway."""
    port = free_port()
    other = dataclasses.replace(
        service,
        port=port,
        env={**service.env, "MMS_PORT": str(port), "MMS_TOKEN_TTL_SECONDS": "60", "MMS_CLOCK_SKEW_SECONDS": "0"},
    )
    server: subprocess.Popen = other.serve("--no-build-worker")
    try:
        yield other
    finally:
        stop(server)


def test_an_expired_token_sends_the_user_back_to_sign_in(page: Page, short_lived: EmbeddedService) -> None:
    account, _ = _new_account(short_lived)
    _sign_in(page, short_lived)
    _pick_account(page, account)
    expect(page.locator("#live")).to_have_text("Live")
    # Nobody touches the page: once the token expires it returns to the sign-in form itself.
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible(timeout=120_000)
    expect(page.get_by_role("alert")).to_contain_text("Sign in again")
    expect(page.locator("#dashboard-view")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('mms.session')") is None
    # Signing in again returns to the same account.
    page.get_by_label("Client id").fill(short_lived.client_id)
    page.get_by_label("Client secret").fill(short_lived.client_secret)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who-account")).to_have_text(f"{SUBSCRIPTION} / {RESOURCE_GROUP} / {account}")


def test_a_dropped_stream_resumes_from_the_last_event_it_saw(page: Page, service: EmbeddedService) -> None:
    port = free_port()
    other = dataclasses.replace(service, port=port, env={**service.env, "MMS_PORT": str(port)})
    server = other.serve("--no-build-worker")  # the module's service builds (one broker)
    try:
        account, api = _new_account(other)
        manifest_id = api.call(
            "POST",
            "/manifests",
            json={
                "name": "resume",
                "modelIds": [],
                "entryScript": "score.py",
                "runtime": "python",
                "assets": [{"id": "score.py", "url": api.upload("score.py", ECHO_SCORE.encode())}],
            },
        ).json()["id"]
        resumed_from: list[str | None] = []
        page.on(
            "request",
            lambda r: resumed_from.append(r.headers.get("last-event-id")) if r.url.endswith("/images/events") else None,
        )
        _sign_in(page, other)
        _pick_account(page, account)
        expect(page.locator("#live")).to_have_text("Live")
        page.evaluate("window.__notReloaded = true")

        stop(server)
        expect(page.locator("#live")).to_have_text("Reconnecting…")
        server = other.serve("--no-build-worker")
        created = api.call(
            "POST", "/images", json={"name": "after-the-drop", "manifestId": manifest_id, "imageType": "Docker"}
        ).json()
        # Only the stream brings it: a resumed stream has no `ready`, so the list is not re-read.
        expect(page.locator(f'tr[data-image-id="{created["Id"]}"]')).to_be_visible(timeout=60_000)
        expect(page.locator("#live")).to_have_text("Live")
        assert page.evaluate("window.__notReloaded") is True
        # It resumed with the last id it saw, as it came: an opaque token, not a number.
        assert resumed_from[0] is None and resumed_from[-1] is not None, resumed_from
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", resumed_from[-1]), resumed_from
    finally:
        stop(server)


def test_a_resume_point_the_service_no_longer_takes_starts_the_stream_afresh(
    page: Page, service: EmbeddedService
) -> None:
    """A dashboard open across the upgrade holds a numeric id of before (or one made under an
    old MMS_SECRET_KEY): its reconnect is a 400 InvalidLastEventId, and it starts afresh
    (``ready`` re-lists the images) rather than stopping its live updates."""
    account, api = _new_account(service)
    resumed_from: list[str | None] = []

    def stream(route) -> None:  # type: ignore[no-untyped-def]
        resumed_from.append(route.request.headers.get("last-event-id"))
        if len(resumed_from) == 1:  # a stream of before: a numeric id, then the server went away
            body = 'retry: 100\nid: 42\nevent: ready\ndata: {"lastEventId": 42}\n\n'
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
        else:
            route.continue_()

    page.route(re.compile(r".*/images/events$"), stream)
    _sign_in(page, service)
    _pick_account(page, account)
    for _ in range(200):  # the fake stream ends, its id is refused, a fresh one opens
        if len(resumed_from) >= 3:
            break
        page.wait_for_timeout(100)
    assert resumed_from[:3] == [None, "42", None], resumed_from
    expect(page.locator("#live")).to_have_text("Live")
    body = {"name": "after-the-upgrade", "manifestId": _manifest(api), "imageType": "Docker"}
    created = api.call("POST", "/images", json=body).json()
    expect(page.locator(f'tr[data-image-id="{created["Id"]}"]')).to_be_visible(timeout=60_000)
    expect(page.get_by_text("Live updates stopped")).to_have_count(0)
    assert len(resumed_from) == 3, resumed_from  # and it stayed on that one


def _manifest(api: Api) -> str:
    return api.call(
        "POST",
        "/manifests",
        json={
            "name": "afresh",
            "modelIds": [],
            "entryScript": "score.py",
            "runtime": "python",
            "assets": [{"id": "score.py", "url": api.upload("score.py", ECHO_SCORE.encode())}],
        },
    ).json()["id"]
