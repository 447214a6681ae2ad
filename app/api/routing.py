"""The route class of every API router: a plain (``def``) endpoint runs in the thread pool, as
FastAPI runs it, but its answer is checked against the response model and serialized on the
event loop. FastAPI sends that to the thread pool too for a plain endpoint: a second hop of
every request between threads, which cost more than the check itself (issue 20)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool


class ApiRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if inspect.isfunction(endpoint) and not (
            inspect.iscoroutinefunction(endpoint)
            or inspect.isgeneratorfunction(endpoint)
            or inspect.isasyncgenfunction(endpoint)
        ):
            endpoint = _in_thread_pool(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _in_thread_pool(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # its signature, for its parameters and dependencies
    async def run(**arguments: Any) -> Any:
        return await run_in_threadpool(functools.partial(endpoint, **arguments))

    return run
