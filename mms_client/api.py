"""The client's one way to the service: signed-in HTTP calls, and every failure as one line.

A call gets a bearer token from, in order: ``MMS_TOKEN`` (used as given, never renewed);
the cached token while it has a minute left; a fresh one from the token endpoint with the
service principal's id and secret (then cached). A 401 on a cached token renews it once.
A call that is safe to repeat (GET, PUT, DELETE, a POST with an ``Idempotency-Key``, or
the token request) is tried again when the service does not answer or answers 429 or 5xx
(after its ``Retry-After``), a few times within a minute. Any failure becomes a
``CliError`` whose message says what went wrong and what to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

from mms_client.diagnostics import hooks
from mms_client.profile import (
    TOKEN_ENV,
    ConfigStore,
    Credentials,
    Profile,
    ProfileError,
    env_server,
    env_token,
)
from mms_client.retrying import IDEMPOTENT_METHODS, TRANSIENT_STATUSES, Transient, attempts, retry_after, transient_http

if TYPE_CHECKING:
    import httpx

_RENEW_BEFORE_SECONDS = 60
_UPLOAD_CHUNK = 1 << 20


class CliError(Exception):
    """A failure to show as one line; ``exit_code`` is the process's."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def fetch_token(
    token_url: str, client_id: str, client_secret: str, scope: str | None, timeout: float = 30.0
) -> tuple[str, float]:
    """Client-credentials grant at ``token_url``: (access token, expiry in epoch seconds)."""
    import httpx

    data = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
    if scope:
        data["scope"] = scope
    try:
        # A client-credentials grant is safe to repeat: each try only issues a token.
        answer = _post_token(token_url, data, timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the token endpoint {token_url}: {_reason(exc)}") from None
    if answer.status_code in (400, 401):
        detail = _oauth_error(answer)
        raise CliError(f"sign-in refused: {detail} (check the client id and secret given to `mms login`)")
    if answer.status_code != 200:
        raise CliError(f"the token endpoint {token_url} answered {answer.status_code}")
    try:
        body = answer.json()
        token = body["access_token"]
        lifetime = float(body.get("expires_in", 3600))
    except (ValueError, KeyError, TypeError):
        raise CliError(f"the token endpoint {token_url} sent no access token") from None
    return token, time.time() + lifetime


def _post_token(token_url: str, data: dict[str, str], timeout: float) -> httpx.Response:
    import httpx

    try:
        for attempt in attempts(transient_http, tries=4, timeout=60.0, wait=0.5):
            with attempt:
                with httpx.Client(timeout=timeout, event_hooks=hooks()) as http:
                    answer = http.post(token_url, data=data)
                if answer.status_code in TRANSIENT_STATUSES:
                    raise _Busy(answer)
                return answer
    except _Busy as busy:
        return busy.response
    raise AssertionError("unreachable")


class ServiceClient:
    """Calls the service on behalf of the profile's principal."""

    def __init__(self, store: ConfigStore | None = None, *, timeout: float = 60.0) -> None:
        import httpx

        self.store = store = store or ConfigStore()
        try:
            self.profile: Profile = store.load_profile()
            server = env_server() or self.profile.server
        except ProfileError as exc:
            raise CliError(str(exc)) from None
        if not server:
            raise CliError(
                "no service is set: run `mms login --service-principal -u <client id> -p <secret> --server <URL>`"
            )
        self.server = server.rstrip("/")
        self.tries, self.retry_seconds, self.retry_wait = 4, 60.0, 0.5
        self._http = httpx.Client(
            base_url=self.server, timeout=httpx.Timeout(timeout, connect=10.0), event_hooks=hooks()
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tokens ------------------------------------------------------------------------

    def _token(self, *, renew: bool = False) -> tuple[str, bool]:
        """(token, renewable): renewable when a fresh one can be fetched on a 401."""
        given = env_token()
        if given:
            return given, False
        credentials = self.store.load_credentials()
        fresh = (
            credentials.access_token
            and credentials.expires_at
            and credentials.expires_at - time.time() > _RENEW_BEFORE_SECONDS
        )
        if fresh and not renew:
            return credentials.access_token, bool(credentials.client_secret)  # type: ignore[return-value]
        if not (self.profile.client_id and credentials.client_secret):
            raise CliError(
                "not signed in, or the sign-in has expired: run `mms login "
                "--service-principal -u <client id> -p <secret> --server <URL>`"
            )
        token, expires_at = fetch_token(
            self.token_url(), self.profile.client_id, credentials.client_secret, self.profile.scope
        )
        self.store.save_credentials(Credentials(credentials.client_secret, token, expires_at))
        return token, True

    def token_url(self) -> str:
        return self.profile.authority or f"{self.server}/oauth2/token"

    # -- requests ----------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        content: Callable[[], Iterator[bytes]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request; a 401 on a cached token renews it and tries once more."""
        import httpx

        token, renewable = self._token()
        for attempt in range(2):
            headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {token}"}
            kwargs["headers"] = headers
            try:
                response = self._send(method, path, content, kwargs)
            except httpx.HTTPError as exc:
                raise CliError(
                    f"cannot reach the service at {self.server}: {_reason(exc)} "
                    "(is it running? `mms env show` shows the URL in use)"
                ) from None
            if response.status_code == 401 and renewable and attempt == 0:
                token, renewable = self._token(renew=True)
                continue
            if response.status_code == 401:
                where = f"the token in {TOKEN_ENV}" if env_token() else "your sign-in"
                raise CliError(
                    f"the service refused {where} ({_service_error(response)}): sign in again with `mms login`"
                )
            if response.status_code not in ok:
                raise CliError(_service_error(response))
            return response
        raise AssertionError("unreachable")

    def _send(
        self, method: str, path: str, content: Callable[[], Iterator[bytes]] | None, kwargs: dict[str, Any]
    ) -> httpx.Response:
        """The request, sent again after a transient failure when it is safe to repeat; the
        last answer (or the last error) when the tries or the time run out."""
        repeatable = method in IDEMPOTENT_METHODS or any(
            k.lower() == "idempotency-key" for k in kwargs.get("headers", {})
        )
        try:
            for attempt in attempts(
                transient_http if repeatable else (lambda exc: False),
                tries=self.tries,
                timeout=self.retry_seconds,
                wait=self.retry_wait,
            ):
                with attempt:
                    response = self._http.request(method, path, content=content() if content else None, **kwargs)
                    if repeatable and response.status_code in TRANSIENT_STATUSES:
                        raise _Busy(response)
                    return response
        except _Busy as busy:
            return busy.response
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        return response.json() if response.content else None

    def account_url(self, *segments: str) -> str:
        """The current account's path and then ``segments``, each quoted (an id cannot
        reach another route)."""
        try:
            base = self.profile.account_path()
        except ProfileError as exc:
            raise CliError(str(exc)) from None
        return base + "".join(f"/{quote(segment, safe='')}" for segment in segments)

    def upload(self, path: Path, name: str, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Upload a local file as an asset of the current account (streamed); its record."""
        size = path.stat().st_size

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while block := handle.read(_UPLOAD_CHUNK):
                    yield block
                    if progress:
                        progress(len(block))

        return self.json(
            "POST",
            self.account_url("assets"),
            params={"name": name},
            content=chunks,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )


class _Busy(Transient):
    """A 429 or 5xx answer to a call that may be sent again."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(
            f"the service answered {response.status_code}", retry_after(response.headers.get("retry-after"))
        )
        self.response = response


def _reason(exc: httpx.HTTPError) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return "connection refused or host not found"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__


def _service_error(response: httpx.Response) -> str:
    """The service's one error shape as a line: message, the first details, the code."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        message = str(body["message"])
        details = [d.get("message") for d in body.get("details") or [] if isinstance(d, dict)]
        details = [d for d in details if d and d not in message]
        if details:
            message += ": " + "; ".join(details[:3])
        return f"{message} [{body.get('code', response.status_code)}]"
    return f"the service answered {response.status_code} {response.reason_phrase}".rstrip()


def _oauth_error(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"the token endpoint answered {response.status_code}"
    if isinstance(body, dict):
        text = body.get("error_description") or body.get("message") or body.get("error")
        if text:
            return str(text)
    return f"the token endpoint answered {response.status_code}"
