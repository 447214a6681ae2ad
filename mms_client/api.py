"""The client's one way to the service: signed-in HTTP calls, and every failure as one line.

A call gets a bearer token from, in order: ``MMS_TOKEN`` (used as given, never renewed);
the cached token while it has a minute left; a fresh one from the token endpoint with the
service principal's id and secret (then cached). A 401 on a cached token renews it once.
A call that is safe to repeat (GET, PUT, DELETE, a POST with an ``Idempotency-Key``, or
the token request) is tried again when the service does not answer or answers 429 or 5xx
(after its ``Retry-After``), a few times within a minute. Any failure becomes a
``ServiceError`` (the SDK's exception; ``CliError`` is the CLI's name for it) whose message
says what went wrong and what to do, and which carries the service's ``code`` and HTTP status.
"""

from __future__ import annotations

import time
import uuid
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


def idempotency_headers() -> dict[str, str]:
    """The headers of a create (a model, manifest, image or service): a key of its own, so the
    call is retried like a GET and a retry after a lost answer gets the first answer instead of
    making a second one (the service remembers a key for MMS_IDEMPOTENCY_TTL_SECONDS, a day by
    default)."""
    return {"Idempotency-Key": str(uuid.uuid4())}


class ServiceError(Exception):
    """A call to the service, or the work around it, failed.

    ``str()`` of the error is one line saying what went wrong and what to do.

    :ivar message: the service's own message when it answered with an error, else that line.
    :ivar code: the service's error code (e.g. ``"NotFound"``), None when the service did not answer
        or the failure is local (a missing file).
    :ivar status_code: the HTTP status of the service's answer, None when there was none.
    :ivar details: the service's ``details`` list (field-level messages), empty when none.
    """

    def __init__(
        self,
        message: str,
        exit_code: int = 1,
        *,
        code: str | None = None,
        status_code: int | None = None,
        details: list[dict[str, Any]] | None = None,
        service_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = service_message if service_message is not None else message
        self.exit_code = exit_code
        self.code = code
        self.status_code = status_code
        self.details = details or []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status_code={self.status_code!r}, message={str(self)!r})"


class CliError(ServiceError):
    """A failure to show as one line; ``exit_code`` is the process's. The same as ``ServiceError``
    for whoever catches it: the command-line client raises it for what it checks itself."""


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

    def __init__(self, store: ConfigStore | None = None, *, timeout: float = 60.0, environment: bool = True) -> None:
        """``environment``: whether ``MMS_SERVER`` and ``MMS_TOKEN`` override the store (the CLI's
        way); the SDK's explicit workspace passes False, so what its caller gave is what is used."""
        import httpx

        self.store = store = store or ConfigStore()
        self.environment = environment
        try:
            self.profile: Profile = store.load_profile()
            server = (env_server() if environment else None) or self.profile.server
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
        given = env_token() if self.environment else None
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
                where = f"the token in {TOKEN_ENV}" if self.environment and env_token() else "your sign-in"
                refused = service_error(response)
                refused.args = (f"the service refused {where} ({refused}): sign in again with `mms login`",)
                raise refused
            if response.status_code not in ok:
                raise service_error(response)
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


def all_pages(
    client: ServiceClient, path: str, params: dict[str, Any] | None = None, limit: int = 10_000
) -> list[dict[str, Any]]:
    """Every record of a paged list, following nextLink (at most ``limit``)."""
    records: list[dict[str, Any]] = []
    page = client.json("GET", path, params=params)
    while True:
        records += page.get("value", [])
        link = page.get("nextLink")
        if not link or len(records) >= limit:
            return records[:limit]
        page = client.json("GET", link)


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


def service_error(response: httpx.Response) -> ServiceError:
    """The service's one error shape (``{code, message, statusCode, details}``) as a ServiceError
    whose line is the message, the first details and the code."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        message = str(body["message"])
        details = [d for d in body.get("details") or [] if isinstance(d, dict)]
        extra = [str(d.get("message")) for d in details if d.get("message") and str(d.get("message")) not in message]
        if extra:
            message += ": " + "; ".join(extra[:3])
        code = str(body["code"]) if body.get("code") else None
        return ServiceError(
            f"{message} [{code or response.status_code}]",
            code=code,
            status_code=response.status_code,
            details=details,
            service_message=str(body["message"]),
        )
    return ServiceError(
        f"the service answered {response.status_code} {response.reason_phrase}".rstrip(),
        status_code=response.status_code,
    )


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
