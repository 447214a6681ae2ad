"""Links the API hands back to clients."""

from __future__ import annotations

from fastapi import Request


def next_link(request: Request, skip_token: str | None) -> str | None:
    """This request's URL with ``$skipToken`` set to the next page, or None on the last page."""
    if skip_token is None:
        return None
    params = {k: v for k, v in request.query_params.items() if k != "$skipToken"}
    params["$skipToken"] = skip_token
    return str(request.url.replace_query_params(**params))


def account_url(request: Request) -> str:
    """This request's account URL, e.g. http://host/api/subscriptions/.../accounts/acct."""
    path = request.url.path
    marker = "/accounts/"
    account_end = path.index("/", path.index(marker) + len(marker))
    return str(request.base_url).rstrip("/") + path[:account_end]


def operation_location(request: Request, operation_id: object) -> str:
    """The Operation-Location a 202 answers: the operation's URL in this request's account."""
    return f"{account_url(request)}/operations/{operation_id}"
