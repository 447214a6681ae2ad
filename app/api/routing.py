"""The route class of every API router: a plain (``def``) endpoint runs in the thread pool, as
FastAPI runs it, but its answer is checked against the response model and serialized on the
event loop. FastAPI sends that to the thread pool too for a plain endpoint: a second trip of
every request between threads, which cost more than the check itself (issue 20). The
request's write session commits in the endpoint's own trip (``end_with_endpoint``), not in a
trip of its own after it."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

# What the request's plain endpoint runs after itself in its thread (the session's COMMIT);
# set by the session dependency before the endpoint is called, in the request's own context.
_THEN: ContextVar[Callable[[], None] | None] = ContextVar("mms.then", default=None)


def end_with_endpoint(end: Callable[[], None] | None) -> None:
    """Have ``end`` run in the thread pool right after this request's plain endpoint returns,
    in the same trip, if the endpoint returns (it does not when the endpoint raises, nor when
    the endpoint is a coroutine: its caller ends the work itself then)."""
    _THEN.set(end)


class ApiRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        answer_fields: list[Any] = []  # the response model's, once FastAPI has made it
        if inspect.isfunction(endpoint) and not (
            inspect.iscoroutinefunction(endpoint)
            or inspect.isgeneratorfunction(endpoint)
            or inspect.isasyncgenfunction(endpoint)
        ):
            endpoint = _in_thread_pool(endpoint, answer_fields)
        super().__init__(path, endpoint, **kwargs)
        if self.response_field is not None:
            answer_fields.append(self.response_field)


def _in_thread_pool(endpoint: Callable[..., Any], answer_fields: list[Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # its signature, for its parameters and dependencies
    async def run(**arguments: Any) -> Any:
        then = _THEN.get()

        def call() -> Any:
            answer = endpoint(**arguments)
            if then is not None:
                # A write whose answer cannot be given is not committed (the 500 rolls it back):
                # checked here first, as FastAPI checks it again on the loop (an instance of the
                # model, as the routes return, passes at once).
                if not isinstance(answer, Response):
                    for field in answer_fields:
                        _, errors = field.validate(answer, {}, loc=("response",))
                        if errors:
                            raise ResponseValidationError(errors=errors, body=answer)
                then()
            return answer

        return await run_in_threadpool(call)

    return run
