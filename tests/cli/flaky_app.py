"""An ASGI app for the API-process supervisor's tests: it fails to start while the file named
by MMS_TEST_FAIL_START exists (a restart during a database failover, say)."""

from __future__ import annotations

import os
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


def factory() -> Starlette:
    if Path(os.environ["MMS_TEST_FAIL_START"]).exists():
        raise RuntimeError("cannot start now")
    return Starlette(routes=[Route("/", lambda request: PlainTextResponse(str(os.getpid())))])
