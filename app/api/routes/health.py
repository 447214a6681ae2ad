"""Liveness (`/health`: the process serves requests), readiness (`/ready`: it can do its
work, because the database and the broker answer) and `/metrics` for Prometheus. None needs a
token; none says more than which dependency failed."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app.api.deps import ContextDep
from app.api.routing import ApiRoute
from app.metrics import render
from app.schemas.health import Readiness

router = APIRouter(tags=["health"], route_class=ApiRoute)
log = logging.getLogger("mms.health")


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The database or the broker does not answer."}},
)
def ready(context: ContextDep) -> JSONResponse:
    """200 when the database and the broker answer, else 503 naming what does not."""
    checks = {"database": _check(_database, context), "broker": _check(context.build_queue.ping)}
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


def _database(context) -> None:  # type: ignore[no-untyped-def]
    # A read session: on SQLite it never waits behind a writer for the lock.
    with context.read_session_factory() as session:
        session.execute(text("SELECT 1"))


def _check(probe, *args) -> str:  # type: ignore[no-untyped-def]
    try:
        probe(*args)
    except Exception as exc:  # noqa: BLE001 (any failure means not ready)
        # The kind of failure only: messages can carry connection strings.
        log.warning("ready.check_failed", extra={"check": getattr(probe, "__name__", "?"), "error": type(exc).__name__})
        return f"unreachable ({type(exc).__name__})"
    return "ok"


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format"}
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics (text format); keep this path on the internal network."""
    body, content_type = render(request.app.state.metrics)
    return Response(body, media_type=content_type)
