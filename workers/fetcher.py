"""Safe fetching of user-supplied URLs for the build workers.

SSRF guard: only http(s); the host is resolved once per hop and every address must be
globally routable (unless the host is allow-listed); the connection is then pinned to
the checked address (IP literal in the request URL, original name in the Host header
and for TLS SNI/certificate checks), so a second DNS answer (rebinding) is never used.
Redirects are followed by hand and re-checked. Query strings (Azure SAS ``sig=``,
``se=``) never reach a log line or an exception message: see ``redact_url``.
``PinnedTransport`` applies the same address rules to a client that makes its own
requests (the registry client reading base images).

A dropped connection, a read timeout, a 5xx or a 429 is tried again (``policy.attempts``
in all, within the deadline, after the server's ``Retry-After`` if it sent one); a download
cut off part way resumes where it stopped with a ``Range`` request, guarded by ``If-Range``
with the first answer's ETag or Last-Modified (without one it starts again).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx

from app.addresses import is_public_address
from mms_client.retrying import TRANSIENT_STATUSES, attempts, retry_after

log = logging.getLogger(__name__)

# Same shape as socket.getaddrinfo: called as resolver(host, port, type=SOCK_STREAM).
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

# A name's lookup ends within this, whatever the system resolver's own timeouts, retries and
# search domains add up to (glibc's can pass a minute): a hanging DNS server must not hold a
# build's fetch or a deploy pass past its deadline. A lookup given up on keeps its thread
# until the resolver itself gives up, so a caller leaves at most (the resolver's own limit /
# RESOLVE_SECONDS) of them behind at once. _LOOKUPS_AT_ONCE is a safety net far above what the
# workers' callers reach that way: a tenant whose names hang must not use up lookups that
# other tenants' fetches and passes need (a small cap would let one do so).
RESOLVE_SECONDS = 10.0
_LOOKUPS_AT_ONCE = 256
_lookups = threading.BoundedSemaphore(_LOOKUPS_AT_ONCE)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_QUERYISH = re.compile(r"\?[^\s'\"]*")


class _RedactQueries(logging.Filter):
    """Scrub query strings from third-party log records (httpcore's debug traces print
    response headers, so a redirect's Location would carry a SAS signature)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = _QUERYISH.sub("?<redacted>", message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


# Logger filters are not inherited by child loggers, hence every name that logs.
_REDACT = _RedactQueries()
for _name in ("httpx", "httpcore.connection", "httpcore.http11", "httpcore.http2", "httpcore.proxy", "httpcore.socks"):
    logging.getLogger(_name).addFilter(_REDACT)


class FetchError(Exception):
    """A fetch failed; ``reason`` is a stable code, the message never holds a query string."""

    def __init__(self, reason: str, message: str, *, status: int | None = None, wait: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status  # the HTTP status of an "http_status" failure
        self.wait = wait  # its Retry-After, in seconds


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and trust settings for fetching (all times in seconds)."""

    max_bytes: int = 2 * 1024**3
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # per socket read
    deadline: float = 1800.0  # whole fetch, all hops (DNS lookups use the system's own timeouts)
    max_redirects: int = 3
    # "host" (any port) or "host:port" / "[v6]:port"; exact, case-insensitive.
    # Allowed hosts skip the address check (they are still resolved once and pinned).
    allow_hosts: frozenset[str] = frozenset()
    verify: bool = True  # False disables TLS verification (tests / dev only)
    ca_bundle: str | None = None  # extra CA file, trusted in addition to the defaults
    attempts: int = 4  # a fetch tried this often in all after transient failures (GET only)
    retry_wait: float = 1.0  # the first backoff (doubled each time, with as much jitter)

    def __post_init__(self) -> None:
        # Frozen, so normalise through object.__setattr__; accepts any iterable of str.
        entries = frozenset(_norm_host(h) for h in self.allow_hosts)
        object.__setattr__(self, "allow_hosts", entries)


@dataclass(frozen=True)
class FetchResult:
    """What was written: final path, byte size, hex sha256 and the redacted final URL."""

    path: Path
    size: int
    sha256: str
    final_url: str
    content_type: str | None


def redact_url(url: str | httpx.URL) -> str:
    """Return ``url`` without userinfo, fragment or query (a query becomes ``?<redacted>``)."""
    text = str(url)
    try:
        parts = urlsplit(text)
        netloc = parts.netloc.rpartition("@")[2]
        base = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else parts.path
        has_query = bool(parts.query)
    except ValueError:  # e.g. broken IPv6 brackets: cut by hand
        base = re.sub(r"//[^/?#]*@", "//", re.split(r"[?#]", text, maxsplit=1)[0])
        has_query = "?" in text.split("#", 1)[0]
    return base + ("?<redacted>" if has_query else "")


def fetch(
    url: str,
    dest: str | os.PathLike[str],
    *,
    policy: FetchPolicy = FetchPolicy(),
    expected_sha256: str | None = None,
    resolver: Resolver = socket.getaddrinfo,
    transport: httpx.BaseTransport | None = None,
) -> FetchResult:
    """Download ``url`` to ``dest`` atomically under ``policy``; raise ``FetchError`` on failure.

    ``transport`` is a test seam; by default a fresh ``httpx.HTTPTransport`` is used per hop.
    """
    deadline = time.monotonic() + policy.deadline
    log.info("fetch.start url=%s", redact_url(url))
    partial = _Partial(Path(dest))

    def retryable(exc: Exception) -> bool | float:
        if not isinstance(exc, FetchError) or time.monotonic() >= deadline:
            return False
        if exc.reason == "http_status" and exc.status in TRANSIENT_STATUSES:
            return True if exc.wait is None else exc.wait
        return exc.reason in ("network_error", "timeout")

    try:
        expected = _check_expected(expected_sha256)
        start = _parse(url)
        ssl_context = _ssl_context(policy) if transport is None else None
        for attempt in attempts(retryable, tries=policy.attempts, timeout=policy.deadline, wait=policy.retry_wait):
            with attempt:
                result = _fetch_once(start, partial, policy, deadline, expected, resolver, transport, ssl_context)
        log.info(
            "fetch.done url=%s size=%d sha256=%s",
            result.final_url,
            result.size,
            result.sha256,
        )
        return result
    except FetchError as exc:
        log.warning("fetch.failed reason=%s error=%s", exc.reason, exc)
        raise
    finally:
        partial.discard()


def _fetch_once(
    url: httpx.URL,
    partial: _Partial,
    policy: FetchPolicy,
    deadline: float,
    expected: str | None,
    resolver: Resolver,
    transport: httpx.BaseTransport | None,
    ssl_context: ssl.SSLContext | None,
) -> FetchResult:
    """One attempt: follow the redirects from ``url`` and save (or resume) the body."""
    current = url
    for _hop in range(policy.max_redirects + 1):
        address = _check_target(current, policy, resolver)
        # A fresh transport per hop: no pooled TLS connection verified for one
        # name is ever reused for another name on the same address.
        if transport is None:
            hop = httpx.HTTPTransport(verify=ssl_context, trust_env=False)
        else:
            hop = transport
        try:
            # The transport is called directly, not through httpx.Client, whose
            # request log line would print the full URL, query included.
            response = hop.handle_request(_request(current, address, policy, deadline, headers=partial.range_headers()))
            try:
                if response.status_code == 416 and partial.size:  # it was all there: again
                    partial.reset()
                    raise FetchError("network_error", f"resuming {redact_url(current)} failed", status=416)
                nxt = _next_hop(response, current)
                if nxt is None:
                    return _save(response, partial, policy, deadline, expected, current)
            finally:
                response.close()
        except httpx.TimeoutException as exc:
            raise _transport_error("timeout", exc, current) from None
        except httpx.HTTPError as exc:
            raise _transport_error("network_error", exc, current) from None
        finally:
            if transport is None:
                hop.close()
        log.info(
            "fetch.redirect status=%d from=%s to=%s",
            response.status_code,
            redact_url(current),
            redact_url(nxt),
        )
        current = nxt
    raise FetchError(
        "too_many_redirects",
        f"more than {policy.max_redirects} redirects fetching {redact_url(url)}",
    )


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    policy: FetchPolicy = FetchPolicy(),
    resolver: Resolver = socket.getaddrinfo,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """POST ``body`` to ``url`` under the same address rules as ``fetch``; the response status.

    Redirects are not followed (a 3xx is returned as it is): a receiver that moved must be
    registered again, rather than have its deliveries sent somewhere nobody vetted.
    """
    deadline = time.monotonic() + policy.deadline
    target = _parse(url)
    address = _check_target(target, policy, resolver)
    hop = transport or httpx.HTTPTransport(verify=_ssl_context(policy), trust_env=False)
    try:
        response = hop.handle_request(
            _request(target, address, policy, deadline, method="POST", content=body, headers=headers)
        )
        response.close()  # the status is the answer; the body is not read (nor trusted to be small)
    except httpx.TimeoutException as exc:
        raise _transport_error("timeout", exc, target) from None
    except httpx.HTTPError as exc:
        raise _transport_error("network_error", exc, target) from None
    finally:
        if transport is None:
            hop.close()
    return response.status_code


def check_url(
    url: str | httpx.URL, *, policy: FetchPolicy = FetchPolicy(), resolver: Resolver = socket.getaddrinfo
) -> str:
    """Vet ``url``'s host as ``fetch`` would, without connecting; the address to connect to.

    For a connection something else makes (the Docker engine pulling an image), which
    resolves the name again itself: the check cannot pin that connection.
    """
    return _check_target(_parse(url), policy, resolver)


class PinnedTransport(httpx.BaseTransport):
    """An httpx transport that sends every request under ``fetch``'s address rules.

    Each origin (scheme, host, port) is resolved and vetted once, on its first request,
    and every request to it is then sent to that address, with the original name in the
    Host header and for TLS (SNI and the certificate check). A refused origin raises
    ``FetchError`` and is never connected to. Redirects are the client's to follow: each
    hop is a request of its own, so it is vetted too. Only the address rules apply here
    (no size or deadline limits: the client sets its own timeouts).
    """

    def __init__(
        self,
        policy: FetchPolicy = FetchPolicy(),
        *,
        verify: ssl.SSLContext | str | bool | None = None,
        resolver: Resolver = socket.getaddrinfo,
    ) -> None:
        self._policy = policy
        self._resolver = resolver
        self._verify = _ssl_context(policy) if verify is None else verify
        self._lock = threading.Lock()
        # One connection pool per origin: a TLS connection verified for one name is
        # never reused for another name on the same address.
        self._origins: dict[tuple[str, str, int | None], tuple[str, httpx.HTTPTransport]] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        address, pool = self._origin(url)
        pinned = httpx.Request(
            request.method,
            url.copy_with(host=address, username=None, password=None),
            headers=request.headers,  # Host: the original name, as the client set it
            stream=request.stream,
            extensions={**request.extensions, "sni_hostname": url.raw_host.decode("ascii")},
        )
        return pool.handle_request(pinned)

    def _origin(self, url: httpx.URL) -> tuple[str, httpx.HTTPTransport]:
        key = (url.scheme, url.raw_host.decode("ascii").lower(), url.port)
        with self._lock:
            known = self._origins.get(key)
            if known is None:
                address = _check_target(_parse(url), self._policy, self._resolver)
                known = (address, httpx.HTTPTransport(verify=self._verify, trust_env=False))
                self._origins[key] = known
            return known

    def close(self) -> None:
        with self._lock:
            origins, self._origins = list(self._origins.values()), {}
        for _, pool in origins:
            pool.close()


def _norm_host(entry: str) -> str:
    return entry.strip().lower().rstrip(".")


def _check_expected(expected: str | None) -> str | None:
    if expected is None:
        return None
    value = expected.strip().lower()
    if not _SHA256.fullmatch(value):
        raise FetchError("bad_checksum", "expected sha256 must be 64 hex characters")
    return value


def _parse(url: str | httpx.URL, what: str = "URL") -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise FetchError("bad_url", f"invalid {what}: {redact_url(url)}") from None
    if parsed.scheme not in ("http", "https"):
        raise FetchError("bad_scheme", f"only http and https are allowed, not {redact_url(url)}")
    if not parsed.raw_host:
        raise FetchError("bad_url", f"{what} has no host: {redact_url(url)}")
    return parsed


def _allowed(host: str, port: int, allow_hosts: frozenset[str]) -> bool:
    name = _norm_host(host)
    bracketed = f"[{name}]" if ":" in name else name
    return bool({name, bracketed, f"{bracketed}:{port}"} & allow_hosts)


def _check_target(url: httpx.URL, policy: FetchPolicy, resolver: Resolver) -> str:
    """Resolve the hop's host once, vet every address, and return the one to connect to."""
    host = url.raw_host.decode("ascii")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]  # literal: nothing to resolve
    except ValueError:
        addresses = _resolve(host, port, resolver)
    if _allowed(host, port, policy.allow_hosts):
        return addresses[0]
    bad = [a for a in addresses if not is_public_address(a)]
    if bad:
        raise FetchError(
            "blocked_address",
            f"refusing {redact_url(url)}: host {host} is at {_kind_of(bad[0])} (the operator "
            "may allow a host with MMS_FETCH_ALLOW_HOSTS)",
        )
    return addresses[0]


def _kind_of(address: str) -> str:
    """The kind of a refused address, for errors tenants read: never the address it resolved
    to (it maps the operator's network)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "a non-public address"
    if isinstance(ip, ipaddress.IPv6Address) and (ip.ipv4_mapped or ip.sixtofour):
        ip = ip.ipv4_mapped or ip.sixtofour
    for flag, kind in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_unspecified", "an unspecified address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
    ):
        if getattr(ip, flag):
            return kind
    return "a non-public address"


def _resolve(host: str, port: int, resolver: Resolver) -> list[str]:
    infos = _look_up(host, port, resolver, RESOLVE_SECONDS)
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    if not addresses:
        raise FetchError("resolve_failed", f"host {host} has no address")
    return addresses


def _look_up(host: str, port: int, resolver: Resolver, seconds: float) -> Sequence[tuple[Any, ...]]:
    """``resolver``'s answer within ``seconds``, in a thread of its own (getaddrinfo cannot be
    interrupted); FetchError "timeout" (tried again, as a read timeout is) past them."""
    started = time.monotonic()
    if not _lookups.acquire(timeout=seconds):
        raise FetchError("timeout", f"host {host} did not resolve within {seconds:g} s (the resolver is not answering)")
    answer: list[Any] = []
    done = threading.Event()

    def look_up() -> None:
        try:
            answer.append(resolver(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # noqa: BLE001 (handed to the caller, raised there)
            answer.append(exc)
        finally:
            _lookups.release()
            done.set()

    try:
        threading.Thread(target=look_up, name=f"resolve {host}", daemon=True).start()
    except BaseException:
        _lookups.release()  # no thread (a pids limit, say): its slot is not lost
        raise
    if not done.wait(max(0.0, seconds - (time.monotonic() - started))):
        raise FetchError("timeout", f"host {host} did not resolve within {seconds:g} s (the resolver is not answering)")
    result = answer[0]
    if isinstance(result, (OSError, UnicodeError)):
        raise FetchError("resolve_failed", f"cannot resolve host {host}: {result}") from None
    if isinstance(result, BaseException):
        raise result
    return result


def _ssl_context(policy: FetchPolicy) -> ssl.SSLContext:
    # trust_env=False: SSL_CERT_FILE & co. must not silently change who we trust.
    context = httpx.create_ssl_context(verify=policy.verify, trust_env=False)
    if policy.verify and policy.ca_bundle:
        try:
            context.load_verify_locations(cafile=policy.ca_bundle)
        except OSError as exc:  # ssl.SSLError is an OSError too
            message = f"cannot load CA bundle {policy.ca_bundle}: {exc}"
            raise FetchError("tls_config", message) from None
    return context


def _request(
    url: httpx.URL,
    address: str,
    policy: FetchPolicy,
    deadline: float,
    *,
    method: str = "GET",
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Request:
    """Build a request to the pinned ``address``, keeping the original name for Host and TLS."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError("timeout", f"deadline exceeded before fetching {redact_url(url)}")
    timeout = {
        "connect": min(policy.connect_timeout, remaining),
        "read": min(policy.read_timeout, remaining),
        "write": min(policy.read_timeout, remaining),
        "pool": min(policy.connect_timeout, remaining),
    }
    return httpx.Request(
        method,
        url.copy_with(host=address, username=None, password=None),
        headers={**(headers or {}), "Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        content=content,
        # httpcore uses sni_hostname for both SNI and certificate hostname matching.
        extensions={"timeout": timeout, "sni_hostname": url.raw_host.decode("ascii")},
    )


def _next_hop(response: httpx.Response, url: httpx.URL) -> httpx.URL | None:
    """Return the redirect target, None for a 2xx, or raise for any other status."""
    location = response.headers.get("location")
    if response.status_code in _REDIRECT_STATUSES and location:
        try:
            target = url.join(location)
        except httpx.InvalidURL:
            raise FetchError("bad_url", f"invalid redirect from {redact_url(url)}") from None
        return _parse(target, what="redirect location")
    if 200 <= response.status_code < 300:
        return None
    raise FetchError(
        "http_status",
        f"HTTP {response.status_code} from {redact_url(url)}",
        status=response.status_code,
        wait=retry_after(response.headers.get("retry-after")),
    )


class _Partial:
    """The temp file beside ``dest`` a download is written to, kept across attempts so a
    broken one can resume: its size, running digest and the answer's validator."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.tmp: str | None = None
        self.size = 0
        self.digest = hashlib.sha256()
        self.validator: str | None = None  # ETag or Last-Modified of the answer being saved

    def range_headers(self) -> dict[str, str]:
        if not (self.size and self.validator):
            return {}
        return {"Range": f"bytes={self.size}-", "If-Range": self.validator}

    def open(self, response: httpx.Response) -> BinaryIO:
        """The file to write ``response`` into: appended to when it continues what is there."""
        continues = (
            response.status_code == 206
            and self.size > 0
            and _range_start(response.headers.get("content-range")) == self.size
        )
        if not continues:
            self.reset()
        headers = response.headers
        if not continues:
            etag = headers.get("etag")
            # A weak ETag does not promise the same bytes: only a strong one guards a range.
            self.validator = etag if etag and not etag.startswith("W/") else headers.get("last-modified")
        if self.tmp is None:
            fd, self.tmp = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".part")
            return os.fdopen(fd, "wb")
        return open(self.tmp, "ab")

    def reset(self) -> None:
        if self.tmp is not None:
            with open(self.tmp, "wb"):
                pass
        self.size, self.digest, self.validator = 0, hashlib.sha256(), None

    def discard(self) -> None:
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


def _range_start(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", (content_range or "").strip())
    return int(match[1]) if match else None


def _save(
    response: httpx.Response,
    partial: _Partial,
    policy: FetchPolicy,
    deadline: float,
    expected: str | None,
    url: httpx.URL,
) -> FetchResult:
    """Stream the body to a temp file beside the destination (appending when it resumes a
    broken download), check limits, then rename into place."""
    safe = redact_url(url)
    dest = partial.dest
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > policy.max_bytes:
        raise FetchError("too_large", f"{safe} is {length} bytes, limit {policy.max_bytes}")
    try:
        out = partial.open(response)
    except OSError as exc:
        raise FetchError("io_error", f"cannot write beside {dest}: {exc.strerror}") from None
    try:
        with out:
            for chunk in response.iter_raw():  # raw: store exactly what the server holds
                if partial.size + len(chunk) > policy.max_bytes:
                    raise FetchError("too_large", f"{safe} exceeds the limit of {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"deadline exceeded while fetching {safe}")
                out.write(chunk)
                partial.digest.update(chunk)
                partial.size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = partial.digest.hexdigest()
        if expected is not None and actual != expected:
            raise FetchError(
                "checksum_mismatch",
                f"sha256 mismatch for {safe}: expected {expected}, got {actual}",
            )
        os.replace(partial.tmp, dest)  # type: ignore[arg-type]
        partial.tmp = None
    except httpx.HTTPError:
        raise  # the connection broke: what arrived is kept for a resumed attempt
    except BaseException as exc:
        partial.discard()
        if isinstance(exc, OSError):
            raise FetchError("io_error", f"cannot write {dest}: {exc.strerror or exc}") from None
        raise
    return FetchResult(dest, partial.size, actual, safe, response.headers.get("content-type"))


def _transport_error(reason: str, exc: Exception, url: httpx.URL) -> FetchError:
    # The library's own text is useful (e.g. TLS verify failures) but scrub anything query-like.
    detail = _QUERYISH.sub("?<redacted>", str(exc)) or type(exc).__name__
    return FetchError(reason, f"{reason.replace('_', ' ')} fetching {redact_url(url)}: {detail}")
