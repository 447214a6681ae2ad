"""The route class of every API router: a plain (``def``) endpoint runs in the thread pool, as
FastAPI runs it, but its answer is checked against the response model and serialized on the
event loop. FastAPI sends that to the thread pool too for a plain endpoint: a second trip of
every request between threads, which cost more than the check itself (issue 20).

The request's session (app.api.deps ``SessionDep``) ends here, not in a dependency's exit: a
plain endpoint's in its own trip (a write's COMMIT and the close after it returns, a ROLLBACK
if it raises), a coroutine endpoint's in one trip after it. A generator dependency's entry and
exit cost a write a tenth of its time on the event loop (issue 20)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import ResponseValidationError
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response


@dataclass(frozen=True, slots=True)
class RequestSession:
    """The request's session and how it ends; each end blocks (it runs in the thread pool)."""

    session: Session
    commit: bool  # a write's: committed when the endpoint returns; a read's is only closed

    def succeeded(self) -> None:
        if self.commit:
            try:
                self.session.commit()
            except BaseException:  # a failed COMMIT: its transaction rolled back, and the 5xx says so
                self.failed()
                raise
        self.session.close()  # a read's connection back to the pool; after a COMMIT, no I/O

    def failed(self) -> None:
        try:
            self.session.rollback()
        finally:
            self.session.close()


# The request's session, set by the session dependency before the endpoint is called, in the
# request's own context.
_SESSION: ContextVar[RequestSession | None] = ContextVar("mms.request_session", default=None)


def _take_session() -> RequestSession | None:
    ending = _SESSION.get()
    if ending is not None:
        _SESSION.set(None)  # ended once
    return ending


# Set on the endpoints this module wraps (functools.wraps copies it to a wrapper of them).
_WRAPPED = "_mms_ends_its_session"


def end_with_endpoint(session: RequestSession) -> None:
    """End ``session`` with this request's endpoint: ``succeeded`` when it returns (a plain
    endpoint's answer checked first), ``failed`` when it raises. A session whose endpoint is
    never called (a later dependency refused the request) took no connection: it is dropped."""
    _SESSION.set(session)


class ApiRoute(APIRoute):
    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        answer_fields: list[Any] = []  # the response model's, once FastAPI has made it
        if getattr(endpoint, _WRAPPED, False):
            pass  # a route of an included router, made again: its endpoint is wrapped already
        elif inspect.isfunction(endpoint) and not (
            inspect.iscoroutinefunction(endpoint)
            or inspect.isgeneratorfunction(endpoint)
            or inspect.isasyncgenfunction(endpoint)
        ):
            endpoint = _in_thread_pool(endpoint, answer_fields)
        elif inspect.iscoroutinefunction(endpoint):
            endpoint = _ending_its_session(endpoint, answer_fields)
        super().__init__(path, endpoint, **kwargs)
        if self.response_field is not None:
            answer_fields.append(self.response_field)


def _in_thread_pool(endpoint: Callable[..., Any], answer_fields: list[Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # its signature, for its parameters and dependencies
    async def run(**arguments: Any) -> Any:
        ending = _take_session()

        def call() -> Any:
            try:
                answer = endpoint(**arguments)
                _check_before_commit(ending, answer, answer_fields)
            except BaseException:
                if ending is not None:
                    ending.failed()
                raise
            if ending is not None:
                ending.succeeded()
            return answer

        return await run_in_threadpool(call)

    setattr(run, _WRAPPED, True)
    return run


def _ending_its_session(endpoint: Callable[..., Any], answer_fields: list[Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)
    async def run(**arguments: Any) -> Any:
        try:
            answer = await endpoint(**arguments)
            _check_before_commit(_SESSION.get(), answer, answer_fields)
        except BaseException:
            ending = _take_session()
            if ending is not None:
                await run_in_threadpool(ending.failed)
            raise
        ending = _take_session()
        if ending is not None:
            await run_in_threadpool(ending.succeeded)
        return answer

    setattr(run, _WRAPPED, True)
    return run


def _check_before_commit(ending: RequestSession | None, answer: Any, answer_fields: list[Any]) -> None:
    """A write whose answer cannot be given is not committed (the 500 rolls it back): checked
    before the COMMIT, as FastAPI checks it again after (an instance of the model, as the routes
    return, passes at once)."""
    if ending is None or not ending.commit or isinstance(answer, Response):
        return
    for field in answer_fields:
        _, errors = field.validate(answer, {}, loc=("response",))
        if errors:
            raise ResponseValidationError(errors=errors, body=answer)


def ends_its_session(route: object) -> bool:
    """Whether ``route`` ends the request's session (an ApiRoute whose endpoint this module wrapped)."""
    return isinstance(route, ApiRoute) and getattr(route.endpoint, _WRAPPED, False)
