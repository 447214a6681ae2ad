"""Liveness (`/health`: the process serves requests) and readiness (`/ready`: it can do its
work, because the database and the broker answer). Neither needs a token; neither says more
than which dependency failed."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import ContextDep

router = APIRouter(tags=["health"])
log = logging.getLogger("mms.health")


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(context: ContextDep) -> JSONResponse:
    """200 when the database and the broker answer, else 503 naming what does not."""
    checks = {"database": _check(_database, context), "broker": _check(context.build_queue.ping)}
    ok = all(value == "ok" for value in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                        status_code=200 if ok else 503)


def _database(context) -> None:  # type: ignore[no-untyped-def]
    with context.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _check(probe, *args) -> str:  # type: ignore[no-untyped-def]
    try:
        probe(*args)
    except Exception as exc:  # noqa: BLE001 (any failure means not ready)
        # The kind of failure only: messages can carry connection strings.
        log.warning("ready.check_failed", extra={"check": getattr(probe, "__name__", "?"),
                                                 "error": type(exc).__name__})
        return f"unreachable ({type(exc).__name__})"
    return "ok"
