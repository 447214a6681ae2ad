"""The dashboard's files: served at /ui under a strict Content-Security-Policy, nothing inline."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.api.routes.ui import FILES, STATIC


def test_the_page_and_its_two_files_are_served_with_a_strict_policy(client: TestClient) -> None:
    moved = client.get("/ui", follow_redirects=False)
    assert moved.status_code == 308 and moved.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/app.css").headers["content-type"].startswith("text/css")


def test_no_other_file_is_served(client: TestClient) -> None:
    for name in ("../main.py", "__init__.py", "app.js.map", "%2e%2e%2fconfig.py"):
        answer = client.get(f"/ui/{name}")
        assert answer.status_code == 404, name
    assert client.get("/ui/nothing.js").json()["code"] == "NotFound"


def test_nothing_runs_inline_and_nothing_keeps_the_token_beyond_the_tab() -> None:
    html = (STATIC / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="app.js">']
    assert not re.search(r"\son[a-z]+=|style=", html)  # no inline handlers or styles (CSP)
    script = (STATIC / "app.js").read_text()
    assert "localStorage." not in script and "console." not in script
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(FILES)
