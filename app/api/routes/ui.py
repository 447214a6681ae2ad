"""The web dashboard at /ui: three static files (no build step), served with a strict CSP."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.api.routing import ApiRoute
from app.errors import NotFound

router = APIRouter(prefix="/ui", tags=["dashboard"], include_in_schema=False, route_class=ApiRoute)

STATIC = Path(str(files("app.ui") / "static"))
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
# Scripts and styles from the files above only (no inline script), API calls to this origin only.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file(name: str) -> FileResponse:
    if name not in FILES:
        raise NotFound(f"the dashboard has no file '{name}'")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)


@router.get("")
def dashboard_root() -> RedirectResponse:
    """The page's own URL ends in a slash, so that its relative links resolve under /ui/."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
def dashboard() -> FileResponse:
    return _file("index.html")


@router.get("/{name}")
def dashboard_file(name: str) -> FileResponse:
    return _file(name)
