"""A client for a remote registry's OCI Distribution API: the calls a daemonless builder needs.

Remote: MMS_REGISTRY, a tenant's base image registry, Docker Hub. The service's own image
store is written directly (``workers.oci.image_store_client``) and served by the API
(``app.api.routes.distribution``).

Why not a library: python-dxf refuses credentials over plain http even on loopback and
forces the token realm to https, so it cannot talk to a registry on 127.0.0.1 with a
password; oras-py targets artifacts, not image configs, and brings requests and
jsonschema. The protocol surface used here is small (HEAD/GET/POST/PUT on four paths), so
it is written on httpx, which the service already uses, and tested against the CNCF
Distribution registry, with and without a password, and against this service's own
``/v2/`` token flow.

Authentication follows the registry's challenge: on a 401 with ``WWW-Authenticate: Basic``
the request is retried with the given login; with ``Bearer realm=..,service=..,scope=..``
a token is fetched from the realm (with the login as Basic credentials, or anonymously)
and cached per scope until a quarter of its lifetime before it expires (``expires_in``,
60 s when the token service does not say, counted from when it was asked for by our clock:
``issued_at`` is the registry's, which may be off), then fetched again before the next
request: a long build never sends a stale token mid-upload. Credentials are only ever sent
over https, or over http to a loopback registry (as Docker treats
127.0.0.0/8 as an insecure registry by default).

A request that is safe to repeat (GET, HEAD, PUT) is tried again after a dropped
connection, a 5xx or a 429 (after its ``Retry-After``): at most ``tries`` attempts (4) within
``retry_seconds`` (120 s). A blob upload that fails is started again from its beginning, and
a blob download that breaks is downloaded again, within that same bound: at one layer only,
the requests inside such an attempt are sent once each, so attempts never multiply (a
registry that always fails gets ``tries`` requests, not ``tries`` squared). A streamed upload
(``upload_stream``) is retried whole by its caller, which alone can make the stream again.
Each retry is told to ``on_retry``, if given (a build's log): a build's own registry is given
a budget long enough to ride out a restart.

No answer is read whole without a cap, as a hostile registry could stream without end: a
manifest or index at most 4 MiB (the OCI distribution spec's suggestion), a token 1 MiB, a
config blob 8 MiB, an error's body 64 KiB (the rest is not read); more fails the call
naming the cap. Layer blobs are streamed to disk and checked against their digest.

Given a ``FetchPolicy`` (a base image named by a tenant), every request, the token realm's
and a blob's redirect to storage included, goes through the fetcher's address rules:
refused at a non-public address unless allow-listed, and pinned to the checked address.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx

from app.registry_address import is_loopback_name
from mms_client.retrying import IDEMPOTENT_METHODS, TRANSIENT_STATUSES, attempts, retry_after
from workers.fetcher import FetchError, FetchPolicy, PinnedTransport, Resolver
from workers.oci.media import INDEX_TYPES, MANIFEST_TYPES

__all__ = ["DIGEST", "ImageReference", "Manifest", "RemoteRegistryClient", "RemoteRegistryError", "retryable"]

logger = logging.getLogger(__name__)

DOCKER_HUB = "registry-1.docker.io"
_ACCEPT = ", ".join((*MANIFEST_TYPES, *INDEX_TYPES))
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
DIGEST = re.compile(r"sha256:[a-f0-9]{64}")  # a blob or manifest digest, exactly
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20
# What a registry may send us in one answer we hold in memory: a hostile one (a tenant
# names its base image) could otherwise stream without end. 4 MiB for manifests and
# indexes is the OCI distribution spec's suggested limit.
MANIFEST_MAX_BYTES = 4 << 20
TOKEN_MAX_BYTES = 1 << 20
CONFIG_MAX_BYTES = 8 << 20
_OTHER_BODY_MAX_BYTES = 64 << 10  # an error's JSON, or the body of a PUT's answer, read for no more
_OTHER_BODY_SECONDS = 10.0  # ... nor longer
_TOKEN_LIFETIME = 60.0  # the distribution token spec's default when expires_in is absent


class RemoteRegistryError(Exception):
    """A registry call failed; ``status`` is the HTTP status (0: no answer), str() says why.

    ``transient``: another attempt may succeed (no answer, a 5xx, a 429), after ``wait``
    seconds when the registry said how long (``Retry-After``)."""

    def __init__(
        self,
        message: str,
        status: int = 0,
        code: str | None = None,
        *,
        transient: bool = False,
        wait: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.transient = transient
        self.wait = wait


def retryable(exc: Exception) -> bool | float:
    """Whether another attempt may succeed: False, True, or the seconds the registry asked for."""
    if isinstance(exc, RemoteRegistryError) and exc.transient:
        return True if exc.wait is None else exc.wait
    return False


@dataclass(frozen=True)
class ImageReference:
    """``host[:port]/repository[:tag][@digest]``, with Docker Hub's defaults applied."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        rest, _, digest = text.partition("@")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            host, path = first.lower(), remainder
        else:
            host, path = DOCKER_HUB, rest
        if host in ("docker.io", "index.docker.io"):  # Docker Hub's names for its registry
            host = DOCKER_HUB
        name, tag = path, None
        colon = path.rfind(":")
        if colon > path.rfind("/"):
            name, tag = path[:colon], path[colon + 1 :]
        if host == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"
        if not _REPOSITORY.fullmatch(name):
            raise ValueError(f"invalid repository name {name!r} in image reference {text!r}")
        if tag is not None and not _TAG.fullmatch(tag):
            raise ValueError(f"invalid tag {tag!r} in image reference {text!r}")
        if digest and not DIGEST.fullmatch(digest):
            raise ValueError(f"invalid digest {digest!r} in image reference {text!r}")
        if tag is None and not digest:
            tag = "latest"
        return cls(host, name, tag, digest or None)

    @property
    def reference(self) -> str:
        """What the manifest is asked for by: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        return f"{text}@{self.digest}" if self.digest else text


@dataclass(frozen=True)
class Manifest:
    """A fetched manifest: its exact bytes (what the digest is of), media type and digest."""

    raw: bytes
    media_type: str
    digest: str
    body: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)


def is_loopback_host(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback_name(name.strip("[]"))


class RemoteRegistryClient:
    """One registry host, one login (or none), one connection pool. Use as a context manager.

    ``policy``: the address rules every request obeys (None: the caller trusts the host, and
    whatever it redirects to, e.g. the service's own registry).
    """

    def __init__(
        self,
        host: str,
        username: str | None = None,
        password: str | None = None,
        *,
        insecure: bool | None = None,
        timeout: float = 300.0,
        verify: str | bool = True,
        policy: FetchPolicy | None = None,
        resolver: Resolver = socket.getaddrinfo,
        tries: int = 4,
        retry_seconds: float = 120.0,
        retry_wait: float = 1.0,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        plain_http = is_loopback_host(host) if insecure is None else insecure
        self.base_url = f"{'http' if plain_http else 'https'}://{host}"
        self._login = (username, password or "") if username else None
        self._tokens: dict[str, tuple[str, float]] = {}  # scope → (bearer token, stale at)
        self._challenges: dict[str, str] = {}  # scope → the Bearer challenge that asked for it
        self._tries, self._retry_seconds, self._retry_wait = tries, retry_seconds, retry_wait
        self._timeout = timeout  # also what reading a small answer whole may take, however it trickles
        self._on_retry = on_retry
        self._basic = False  # the registry asked for Basic credentials
        transport = None if policy is None else PinnedTransport(policy, verify=verify, resolver=resolver)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=30.0),
            verify=verify,
            follow_redirects=False,
            trust_env=False,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- manifests ---------------------------------------------------------------------

    def get_manifest(
        self, repository: str, reference: str, *, platform: tuple[str, str] = ("linux", "amd64")
    ) -> Manifest:
        """The image manifest of ``repository:reference``, choosing ``platform`` from an index."""
        manifest = self._get_manifest(repository, reference)
        if manifest.media_type in INDEX_TYPES:
            wanted_os, wanted_arch = platform
            for entry in manifest.body.get("manifests", []):
                plat = entry.get("platform") or {}
                if plat.get("os") == wanted_os and plat.get("architecture") == wanted_arch:
                    return self._get_manifest(repository, entry["digest"])
            raise RemoteRegistryError(
                f"{self.host}/{repository}:{reference} has no image for {wanted_os}/{wanted_arch}",
                404,
                "MANIFEST_UNKNOWN",
            )
        return manifest

    def find_manifest(self, repository: str, reference: str) -> Manifest | None:
        """Like ``get_manifest`` without an index, but None when it does not exist."""
        try:
            return self._get_manifest(repository, reference)
        except RemoteRegistryError as exc:
            if exc.status == 404:
                return None
            raise

    def _get_manifest(self, repository: str, reference: str) -> Manifest:
        response, raw = self._request_body(
            "GET",
            f"/v2/{repository}/manifests/{reference}",
            scope=f"repository:{repository}:pull",
            headers={"Accept": _ACCEPT},
            max_bytes=MANIFEST_MAX_BYTES,
            what=f"{self.host}/{repository}:{reference}: the manifest",
        )
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        if reference.startswith("sha256:") and digest != reference:
            raise RemoteRegistryError(
                f"{self.host}/{repository}@{reference}: the registry sent a manifest whose digest is {digest}"
            )
        try:
            body = json.loads(raw)
        except ValueError:
            raise RemoteRegistryError(f"{self.host}/{repository}:{reference}: manifest is not JSON") from None
        if not isinstance(body, dict):
            raise RemoteRegistryError(f"{self.host}/{repository}:{reference}: manifest is not a JSON object")
        media_type = body.get("mediaType") or response.headers.get("content-type", "").split(";")[0]
        if media_type not in (*MANIFEST_TYPES, *INDEX_TYPES):
            raise RemoteRegistryError(
                f"{self.host}/{repository}:{reference}: unsupported manifest "
                f"type {media_type or 'unknown'} (schema 1 images are not supported)"
            )
        return Manifest(raw, media_type, digest, body)

    def put_manifest(self, repository: str, tag: str, raw: bytes, media_type: str) -> str:
        """Push a manifest under ``tag``; return its digest."""
        digest = f"sha256:{hashlib.sha256(raw).hexdigest()}"
        self._request(
            "PUT",
            f"/v2/{repository}/manifests/{tag}",
            scope=f"repository:{repository}:pull,push",
            headers={"Content-Type": media_type},
            content=raw,
            ok=(201,),
        )
        return digest

    # -- blobs -------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The blob's size when ``repository`` has it, else None."""
        try:
            response = self._request(
                "HEAD", f"/v2/{repository}/blobs/{digest}", scope=f"repository:{repository}:pull", ok=(200,)
            )
        except RemoteRegistryError as exc:
            if exc.status == 404:
                return None
            raise
        return int(response.headers.get("content-length", 0))

    def get_blob(self, repository: str, digest: str, max_bytes: int = CONFIG_MAX_BYTES) -> bytes:
        """A small blob (a config) read whole, its digest checked."""
        for attempt in self._attempts():
            with attempt, self.open_blob(repository, digest, retry=False) as chunks:
                data = bytearray()
                for chunk in chunks:
                    data += chunk
                    if len(data) > max_bytes:
                        raise _too_large(f"{self.host}/{repository}: blob {digest}", max_bytes)
        if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise RemoteRegistryError(f"{self.host}/{repository}: blob {digest} arrived corrupted")
        return bytes(data)

    def download_blob(self, repository: str, digest: str, dest: Path) -> int:
        """Stream a blob to ``dest``, checking its digest; return its size."""
        for attempt in self._attempts():
            with attempt, self.open_blob(repository, digest, retry=False) as chunks, dest.open("wb") as out:
                hasher, size = hashlib.sha256(), 0
                for chunk in chunks:
                    hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        if f"sha256:{hasher.hexdigest()}" != digest:
            dest.unlink(missing_ok=True)
            raise RemoteRegistryError(f"{self.host}/{repository}: blob {digest} arrived corrupted")
        return size

    def open_blob(self, repository: str, digest: str, *, retry: bool = True) -> _BlobStream:
        """The blob's bytes as a stream of chunks (the registry may redirect to storage).

        ``retry``: open it again after a transient failure; False where the caller retries
        the whole read itself, so that attempts do not multiply."""
        return _BlobStream(self, repository, digest, retry)

    def push_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        body: Callable[[], Iterable[bytes]],
        *,
        mount_from: str | None = None,
    ) -> str:
        """Make ``repository`` hold the blob; return how: present, mounted or uploaded.

        ``body`` opens the content afresh each time it is called, so an upload can be
        retried after the registry asks for credentials, or started again after a failure.
        """
        if self.blob_size(repository, digest) is not None:
            return "present"
        for attempt in self._attempts():
            with attempt:
                return self._push_blob_once(repository, digest, size, body, mount_from)
        raise AssertionError("unreachable")

    def _push_blob_once(
        self, repository: str, digest: str, size: int, body: Callable[[], Iterable[bytes]], mount_from: str | None
    ) -> str:
        scope = f"repository:{repository}:pull,push"
        params = {}
        if mount_from and mount_from != repository:
            scope += f" repository:{mount_from}:pull"
            params = {"mount": digest, "from": mount_from}
        # Tried once: push_blob tries the whole upload again.
        start = self._request(
            "POST", f"/v2/{repository}/blobs/uploads/", scope=scope, params=params, ok=(201, 202), retry=False
        )
        if start.status_code == 201:
            return "mounted"
        location = start.headers.get("location")
        if not location:
            raise RemoteRegistryError(f"{self.host}: the registry started an upload without a Location")
        # Not retried alone: a failed PUT may have ended the upload; push_blob starts anew.
        self._request(
            "PUT",
            _with_digest(urljoin(self.base_url + "/", location), digest),
            scope=scope,
            content=body,
            ok=(201,),
            retry=False,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        return "uploaded"

    def upload_stream(self, repository: str, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Upload a blob whose digest is known only at its end (a layer compressed while it
        is sent): POST, one streamed PATCH, PUT with the digest. Returns (digest, size).

        Each request is sent once: only the caller can make the stream again, so it retries
        the whole upload (and attempts do not multiply)."""
        scope = f"repository:{repository}:pull,push"
        start = self._request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope, ok=(202,), retry=False)
        location = start.headers.get("location")
        if not location:
            raise RemoteRegistryError(f"{self.host}: the registry started an upload without a Location")
        hasher, size, sent = hashlib.sha256(), 0, False

        def body() -> Iterator[bytes]:
            nonlocal size, sent
            if sent:  # a stream cannot be replayed after an authentication retry
                raise RemoteRegistryError(f"registry {self.host} asked for credentials mid-upload")
            sent = True
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                yield chunk

        patch = self._request(
            "PATCH",
            urljoin(self.base_url + "/", location),
            scope=scope,
            content=body,
            ok=(202, 204),
            retry=False,
            headers={"Content-Type": "application/octet-stream"},
        )
        digest = f"sha256:{hasher.hexdigest()}"
        location = patch.headers.get("location") or location
        self._request(
            "PUT",
            _with_digest(urljoin(self.base_url + "/", location), digest),
            scope=scope,
            ok=(201,),
            retry=False,
            headers={"Content-Length": "0"},
        )
        return digest, size

    # -- the HTTP exchange with authentication -----------------------------------------

    def retries(self) -> Iterator[Any]:
        """Attempts at an operation its caller repeats whole (a streamed upload, which only
        the caller can make again), under this client's tries, time budget and ``on_retry``:
        ``for attempt in client.retries(): with attempt: ...``."""
        return self._attempts()

    def _attempts(self, retry: bool = True) -> Iterator[Any]:
        """Attempts at one call; each retry is told to ``on_retry`` first (a build's log, whose
        writer also stops a build cancelled or past its deadline while the registry is away)."""
        failures: list[Exception] = []

        def on(exc: Exception) -> bool | float:
            failures.append(exc)
            return retryable(exc) if retry else False

        for attempt in attempts(on, tries=self._tries, timeout=self._retry_seconds, wait=self._retry_wait):
            if attempt.num > 1 and self._on_retry is not None:
                self._on_retry(
                    f"registry unreachable or failing: {failures[-1]}; retrying "
                    f"(attempt {attempt.num}, for up to {self._retry_seconds:g} s)"
                )
            yield attempt

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        scope: str,
        ok: tuple[int, ...] = (200,),
        content: bytes | Callable[[], Iterable[bytes]] | None = None,
        stream: bool = False,
        retry: bool | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One exchange (with authentication); repeated on a transient failure when ``retry``
        (by default: for an idempotent method)."""
        for attempt in self._attempts(method in IDEMPOTENT_METHODS if retry is None else retry):
            with attempt:
                return self._exchange(
                    method, path_or_url, scope=scope, ok=ok, content=content, stream=stream, **dict(kwargs)
                )
        raise AssertionError("unreachable")

    def _request_body(
        self, method: str, path: str, *, scope: str, max_bytes: int, what: str, **kwargs: Any
    ) -> tuple[httpx.Response, bytes]:
        """``_request`` with the answer's body read, at most ``max_bytes`` of it (``what`` names
        it in the error); a read that breaks off is repeated like a request without answer."""
        for attempt in self._attempts():
            with attempt:
                response = self._exchange(
                    method, path, scope=scope, ok=(200,), content=None, stream=True, **dict(kwargs)
                )
                try:
                    return response, _read_at_most(response, max_bytes, what, deadline=time.monotonic() + self._timeout)
                except httpx.HTTPError as exc:
                    raise RemoteRegistryError(
                        f"{what}: the answer broke off: {type(exc).__name__}: {exc}", transient=True
                    ) from None
                finally:
                    response.close()
        raise AssertionError("unreachable")

    def _exchange(
        self,
        method: str,
        path_or_url: str,
        *,
        scope: str,
        ok: tuple[int, ...],
        content: bytes | Callable[[], Iterable[bytes]] | None,
        stream: bool,
        **kwargs: Any,
    ) -> httpx.Response:
        url = path_or_url if "://" in path_or_url else self.base_url + path_or_url
        for attempt in range(2):
            headers = {**kwargs.pop("headers", {}), **self._auth_header(scope)}
            body = content() if callable(content) else content
            request = self._http.build_request(method, url, headers=headers, content=body, **kwargs)
            kwargs["headers"] = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            try:
                # Always streamed, so no answer is read whole: see _read_at_most.
                response = self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise RemoteRegistryError(
                    f"registry {self.host} did not answer {method} {urlsplit(url).path}: {type(exc).__name__}: {exc}",
                    transient=True,
                ) from None
            except FetchError as exc:
                raise self._refused(exc, url) from None
            if response.status_code == 401 and attempt == 0:
                challenge = response.headers.get("www-authenticate", "")
                _discard(response)
                self._authenticate(challenge, scope)
                continue
            if response.status_code in ok:
                if not stream:
                    _discard(response)
                return response
            raise _error_from(self.host, method, url, response, _discard(response))
        raise AssertionError("unreachable")

    def _auth_header(self, scope: str) -> dict[str, str]:
        cached = self._tokens.get(scope)
        if cached and time.monotonic() >= cached[1] and scope in self._challenges:
            self._authenticate(self._challenges[scope], scope)  # about to expire: a new one
            cached = self._tokens.get(scope)
        if cached:
            return {"Authorization": f"Bearer {cached[0]}"}
        if self._basic and self._login:
            user, password = self._login
            raw = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        return {}

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if not self._login:
                raise RemoteRegistryError(
                    f"registry {self.host} requires authentication and no login was given", 401, "UNAUTHORIZED"
                )
            self._check_channel()
            self._basic = True
            return
        if scheme != "bearer":
            raise RemoteRegistryError(
                f"registry {self.host} asks for unsupported authentication {scheme or '(none)'}", 401, "UNAUTHORIZED"
            )
        params = dict(_CHALLENGE_PARAM.findall(challenge))
        realm = params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise RemoteRegistryError(f"registry {self.host} sent a Bearer challenge without a realm", 401)
        query = [("service", params["service"])] if "service" in params else []
        # Our scope names every repository the call touches (a mount reads another one).
        query += [("scope", s) for s in scope.split()]
        auth = None
        if self._login:
            if urlsplit(realm).scheme != "https" and not is_loopback_host(urlsplit(realm).netloc):
                raise RemoteRegistryError(
                    f"registry {self.host}'s token service {urlsplit(realm).netloc} "
                    "is not https: the login is not sent there",
                    401,
                )
            auth = httpx.BasicAuth(*self._login)
        asked_at = time.monotonic()  # the token is no older than this, whatever it says
        try:
            answer = self._http.send(self._http.build_request("GET", realm, params=query), auth=auth, stream=True)
            try:
                if answer.status_code != 200:
                    _discard(answer)
                else:
                    raw = _read_at_most(
                        answer,
                        TOKEN_MAX_BYTES,
                        f"token service of {self.host}: the token",
                        deadline=time.monotonic() + self._timeout,
                    )
            finally:
                answer.close()
        except httpx.HTTPError as exc:
            raise RemoteRegistryError(f"token service of {self.host} did not answer: {exc}", transient=True) from None
        except FetchError as exc:
            raise self._refused(exc, realm, "the token service") from None
        if answer.status_code in TRANSIENT_STATUSES:
            raise RemoteRegistryError(
                f"registry {self.host}: token service answered {answer.status_code}",
                answer.status_code,
                transient=True,
                wait=retry_after(answer.headers.get("retry-after")),
            )
        if answer.status_code != 200:
            who = "the login was refused" if self._login else "a login is required"
            raise RemoteRegistryError(
                f"registry {self.host}: {who} (token service answered {answer.status_code})", 401, "UNAUTHORIZED"
            )
        try:
            data = json.loads(raw)
            token = data.get("token") or data["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise RemoteRegistryError(f"token service of {self.host} sent no token") from None
        self._tokens[scope] = (token, asked_at + _fresh_for(data))
        self._challenges[scope] = challenge

    def _refused(self, exc: FetchError, url: str, what: str = "the address") -> RemoteRegistryError:
        """The policy's refusal, naming the host but never the address it resolved to."""
        where = urlsplit(url).netloc.rpartition("@")[2]
        if exc.reason != "blocked_address":  # e.g. a name that does not resolve
            return RemoteRegistryError(f"registry {self.host}: {exc}")
        subject = f"registry {self.host}" if where == self.host else f"{what} {where} of registry {self.host}"
        return RemoteRegistryError(
            f"{subject} is at a private address; ask the operator to allow it (MMS_FETCH_ALLOW_HOSTS)",
            0,
            "BLOCKED_ADDRESS",
        )

    def _check_channel(self) -> None:
        if self.base_url.startswith("http://") and not is_loopback_host(self.host):
            raise RemoteRegistryError(
                f"registry {self.host} is plain http: the login is not sent over an unencrypted connection", 401
            )


class _BlobStream:
    """``with client.open_blob(..) as chunks:`` — follows a redirect to blob storage."""

    def __init__(self, client: RemoteRegistryClient, repository: str, digest: str, retry: bool) -> None:
        self._client, self._repository, self._digest = client, repository, digest
        self._retry = retry
        self._response: httpx.Response | None = None

    def __enter__(self) -> Iterator[bytes]:
        client = self._client
        response = client._request(
            "GET",
            f"/v2/{self._repository}/blobs/{self._digest}",
            scope=f"repository:{self._repository}:pull",
            ok=(200, 307, 302),
            stream=True,
            retry=self._retry,
        )
        if response.status_code in (302, 307):
            # Storage redirects (S3, Azure) are pre-signed: no registry credentials there.
            # Sent through the same client, so a policy vets the new host too.
            target = urljoin(str(response.url), response.headers["location"])
            response.close()
            try:
                response = client._http.send(client._http.build_request("GET", target), stream=True)
            except httpx.HTTPError as exc:
                raise RemoteRegistryError(
                    f"blob {self._digest}: storage did not answer: {type(exc).__name__}: {exc}", transient=True
                ) from None
            except FetchError as exc:
                raise client._refused(exc, target, "the blob storage") from None
            if response.status_code != 200:
                response.close()
                raise RemoteRegistryError(
                    f"blob {self._digest}: storage answered {response.status_code}",
                    response.status_code,
                    transient=response.status_code in TRANSIENT_STATUSES,
                    wait=retry_after(response.headers.get("retry-after")),
                )
        self._response = response
        return self._chunks(response)

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(_CHUNK)
        except httpx.HTTPError as exc:  # the connection broke mid-blob
            raise RemoteRegistryError(
                f"blob {self._digest}: the download broke off: {type(exc).__name__}: {exc}", transient=True
            ) from None

    def __exit__(self, *exc: object) -> None:
        if self._response is not None:
            self._response.close()


def _fresh_for(token: dict[str, Any]) -> float:
    """Seconds a token is used for, counted from its receipt: its lifetime (``expires_in``,
    60 s by default) less a quarter of it (at most 30 s) as a margin. ``issued_at`` is the
    registry's clock, not ours: a skewed one must not make every request fetch a token."""
    try:
        lifetime = float(token.get("expires_in") or _TOKEN_LIFETIME)
    except (TypeError, ValueError):
        lifetime = _TOKEN_LIFETIME
    if not lifetime > 0:  # also NaN
        lifetime = _TOKEN_LIFETIME
    return lifetime - min(lifetime / 4, 30.0)


def _with_digest(url: str, digest: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "digest"]
    query.append(("digest", digest))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _read_at_most(response: httpx.Response, max_bytes: int, what: str, *, deadline: float) -> bytes:
    """A streamed answer's body, or RemoteRegistryError as soon as it passes ``max_bytes`` (counted
    decoded, so a compressed answer cannot expand past it either) or ``deadline`` (monotonic:
    the read timeout bounds each read, not an answer that trickles in)."""
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(what, max_bytes)
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > max_bytes:
            raise _too_large(what, max_bytes)
        if time.monotonic() > deadline:
            raise RemoteRegistryError(f"{what} took too long to arrive", 0, "TOO_SLOW")
    return bytes(data)


def _too_large(what: str, max_bytes: int) -> RemoteRegistryError:
    size = f"{max_bytes >> 20} MiB" if max_bytes % (1 << 20) == 0 else f"{max_bytes} bytes"
    return RemoteRegistryError(f"{what} exceeds the limit of {size}", 0, "TOO_LARGE")


def _discard(response: httpx.Response) -> bytes:
    """Read and close an answer whose body matters little: up to 64 KiB of it (an error's
    JSON) for up to 10 s, so the connection can be reused; the rest of a longer or slower
    body is cut off with the connection."""
    data = bytearray()
    deadline = time.monotonic() + _OTHER_BODY_SECONDS
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > _OTHER_BODY_MAX_BYTES or time.monotonic() > deadline:
                break
    except httpx.HTTPError:
        pass  # the status is the answer
    finally:
        response.close()
    return bytes(data[:_OTHER_BODY_MAX_BYTES])


def _error_from(host: str, method: str, url: str, response: httpx.Response, body: bytes) -> RemoteRegistryError:
    code, detail = None, ""
    try:
        errors = json.loads(body).get("errors") or []
        if errors:
            code = errors[0].get("code")
            detail = errors[0].get("message") or ""
    except (ValueError, AttributeError):
        pass
    path = urlsplit(url).path  # never the query: an upload URL's state stays out of messages
    what = {401: "the login was refused", 403: "access denied", 404: "not found"}.get(
        response.status_code, f"answered {response.status_code}"
    )
    message = f"registry {host}: {method} {path}: {what}"
    if code or detail:
        message += f" ({code or ''}{': ' if code and detail else ''}{detail})"
    return RemoteRegistryError(
        message,
        response.status_code,
        code,
        transient=response.status_code in TRANSIENT_STATUSES,
        wait=retry_after(response.headers.get("retry-after")),
    )


def file_chunks(path: Path) -> Callable[[], Iterator[bytes]]:
    """A body for ``push_blob`` that reads ``path`` afresh on every call."""

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(_CHUNK):
                yield block

    return chunks
