"""What ``--verbose`` and ``--debug`` show on stderr: a line per HTTP call, or (debug) each
request and response in full, as az's --debug does, with every secret replaced by ``***``:
credentials headers, form fields and JSON members named like a secret, the client secret and
tokens of the token request and its answer, and the query strings of signed URLs."""

from __future__ import annotations

import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:
    import httpx


REDACTED = "***"
_SECRET_NAME = re.compile(
    r"secret|passw|(?:^|[_-])pass$|^pwd$|token|assertion|signature|credential|authorization|apikey|(?:^|[_-])key$"
    r"|^sig$|^code$|^(?:primary|secondary)key$|^keyvalue$|^kubeconfig$",
    re.IGNORECASE,
)
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
_SIGNED_URL = re.compile(r"(https?://[^\s\"'?]+)\?[^\s\"']*")
_BODY_LIMIT = 4000  # characters of a body shown; a build log can be long


class Verbosity:
    """Set by the global ``--verbose`` and ``--debug`` options (mms_client/cli.py)."""

    verbose = False
    debug = False


def hooks() -> dict[str, list[Any]]:
    """httpx event hooks that print the calls as the options ask (none when neither is given)."""
    if Verbosity.debug:
        return {"request": [_debug_request], "response": [_debug_response]}
    if Verbosity.verbose:
        return {"request": [_start], "response": [_summary]}
    return {}


def _say(level: str, text: str) -> None:
    sys.stderr.write("".join(f"{level}: {line}\n" for line in text.splitlines() or [""]))


def _start(request: httpx.Request) -> None:
    request.extensions = {**request.extensions, "mms_started": time.monotonic()}


def _summary(response: httpx.Response) -> None:
    request = response.request
    took = time.monotonic() - request.extensions.get("mms_started", time.monotonic())
    _say("INFO", f"{request.method} {redact_url(str(request.url))} -> {response.status_code} ({took:.2f} s)")


def _debug_request(request: httpx.Request) -> None:
    import httpx

    _start(request)
    _say("DEBUG", f"Request URL: {redact_url(str(request.url))}")
    _say("DEBUG", f"Request method: {request.method}")
    _say("DEBUG", "Request headers:\n" + _headers(request.headers))
    try:
        body = request.content
    except httpx.RequestNotRead:  # an upload, streamed from a file
        _say("DEBUG", "Request body: (streamed)")
        return
    if body:
        _say("DEBUG", "Request body:\n" + _body(body, request.headers.get("content-type", "")))


def _debug_response(response: httpx.Response) -> None:
    response.read()
    _summary(response)
    _say("DEBUG", "Response headers:\n" + _headers(response.headers))
    if response.content:
        _say("DEBUG", "Response content:\n" + _body(response.content, response.headers.get("content-type", "")))


def _headers(headers: httpx.Headers) -> str:
    return (
        "\n".join(f"    {name!r}: {_header_value(name, value)!r}" for name, value in headers.multi_items())
        or "    (none)"
    )


def _header_value(name: str, value: str) -> str:
    if name.lower() not in _SECRET_HEADERS:
        return _SIGNED_URL.sub(rf"\1?{REDACTED}", value)
    scheme, _, credentials = value.partition(" ")
    return f"{scheme} {REDACTED}" if credentials else REDACTED


def _body(content: bytes, content_type: str) -> str:
    text = content.decode("utf-8", errors="replace")
    if "x-www-form-urlencoded" in content_type:
        text = urlencode([(k, REDACTED if _SECRET_NAME.search(k) else v) for k, v in parse_qsl(text)], safe="*")
    elif "json" in content_type:
        try:
            text = json.dumps(redact(json.loads(text)), indent=2)
        except ValueError:
            pass
    text = _SIGNED_URL.sub(rf"\1?{REDACTED}", text)
    return (
        text if len(text) <= _BODY_LIMIT else text[:_BODY_LIMIT] + f"\n... ({len(text) - _BODY_LIMIT} more characters)"
    )


def redact(value: Any) -> Any:
    """A JSON document with the members named like a secret replaced."""
    if isinstance(value, dict):
        return {k: REDACTED if _SECRET_NAME.search(k) and v else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def redact_url(url: str) -> str:
    """``url`` with the password in it and the values of its secret-named query parameters replaced."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username}:{REDACTED}@{host}")
    if not parts.query:
        return urlunsplit(parts)
    query = [(k, REDACTED if _SECRET_NAME.search(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))
