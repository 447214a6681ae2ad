"""Hostile-input tests for workers.fetcher.

All traffic stays on 127.0.0.1: refused addresses go to a transport that fails the
test if it is ever asked to connect, and "public" addresses are only ever reached
through a transport that rewrites them to the local server.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from workers.fetcher import (
    FetchError,
    FetchPolicy,
    PinnedTransport,
    check_url,
    fetch,
    is_public_address,
    redact_url,
)

PUBLIC_IP = "93.184.216.34"  # never connected to: LoopbackOnly rewrites it to 127.0.0.1
PAYLOAD = b"model-bytes " * 100
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
SECRET_QUERY = "?sv=2024-05-04&se=2099-01-01T00%3A00Z&sp=r&sig=SUPERSECRETSIG%3D"
SECRETS = ("SUPERSECRETSIG", "2099-01-01")


# --- local servers -----------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        (route or body(b"not found", status=404))(self)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # client hung up on purpose
        pass


def body(data: bytes, status: int = 200, length: bool = True, headers=()):
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect(location: str, status: int = 302):
    return body(b"", status=status, headers=[("Location", location)])


def stall(h: BaseHTTPRequestHandler) -> None:
    h.server.release.wait(5)  # released by the fixture at teardown


def drip(h: BaseHTTPRequestHandler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "10000")
    h.end_headers()
    for _ in range(150):  # ~3 s at most, then a short body: bounded even if the deadline fails
        if h.server.release.wait(0.02):
            return
        h.wfile.write(b"x")


@pytest.fixture
def serve():
    """Start real HTTP(S) servers on 127.0.0.1; all are stopped at teardown."""
    started = []

    def start(routes: dict, tls: ssl.SSLContext | None = None) -> _Server:
        srv = _Server(("127.0.0.1", 0), _Handler)
        srv.routes, srv.seen, srv.release = routes, [], threading.Event()
        srv.port = srv.server_address[1]
        if tls is not None:
            srv.socket = tls.wrap_socket(srv.socket, server_side=True)
        thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((srv, thread))
        return srv

    yield start
    for srv, thread in started:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


# --- helpers -----------------------------------------------------------------------


def policy(**kw) -> FetchPolicy:
    kw = {"connect_timeout": 2, "read_timeout": 2, "deadline": 10, "retry_wait": 0.01, **kw}
    return FetchPolicy(**kw)


def resolver_for(mapping: dict[str, list[str]], calls: list[str] | None = None):
    """A getaddrinfo stand-in; a list of lists is consumed one answer per call."""

    def resolve(host, port, *args, **kwargs):
        if calls is not None:
            calls.append(host)
        answer = mapping[host]
        if answer and isinstance(answer[0], list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answer]

    return resolve


def no_resolve(*args, **kwargs):
    raise AssertionError("resolver must not be called")


class NoConnect(httpx.BaseTransport):
    """Fails the test on any connection attempt."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected connection to {request.url.host}")


class LoopbackOnly(httpx.BaseTransport):
    """Records where each request goes; forwards to loopback only (rewriting listed IPs)."""

    def __init__(self, rewrite: dict[str, int] | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.rewrite = rewrite or {}
        self.seen: list[tuple[str, str, str | None]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.seen.append((host, request.headers["host"], request.extensions.get("sni_hostname")))
        if host in self.rewrite:
            url = request.url.copy_with(host="127.0.0.1", port=self.rewrite[host])
        elif host == "127.0.0.1":
            url = request.url
        else:
            raise AssertionError(f"refusing to connect to non-loopback {host}")
        forwarded = httpx.Request("GET", url, headers=request.headers, extensions=request.extensions)
        return self.inner.handle_request(forwarded)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def loopback():
    transports = []

    def make(rewrite=None) -> LoopbackOnly:
        transports.append(LoopbackOnly(rewrite))
        return transports[-1]

    yield make
    for t in transports:
        t.close()


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- redact_url / address classification -----------------------------------------


def test_redact_url_drops_query_userinfo_and_fragment():
    url = "https://user:pw@acct.blob.core.windows.net:443/c/model.tgz" + SECRET_QUERY + "#frag"
    assert redact_url(url) == "https://acct.blob.core.windows.net:443/c/model.tgz?<redacted>"
    assert redact_url("http://h.test/a/b") == "http://h.test/a/b"
    assert redact_url("http://[::1/x?sig=SECRET") == "http://[::1/x?<redacted>"


BLOCKED = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "127.0.0.1",
    "0.0.0.0",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "192.0.0.192",  # a cloud's instance metadata, global to Python
    "192.0.0.9",
    "::ffff:192.0.0.192",
    "198.18.0.1",
    "::1",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a00:1",
    "64:ff9b::7f00:1",
    "64:ff9b:1::808:808",
    "2002:a00:1::",
    "2002:7f00:1::",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "fe80::1",
    "fe80::1%eth0",
    "fc00::1",
    "fd12::1",
    "fec0::1",
    "ff02::1",
    "2001:db8::1",
    "::a00:1",
    "not-an-ip",
]
PUBLIC = ["8.8.8.8", PUBLIC_IP, "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]


@pytest.mark.parametrize("address", BLOCKED)
def test_non_public_addresses_are_not_public(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_public(address):
    assert is_public_address(address)


# --- SSRF guard --------------------------------------------------------------------


@pytest.mark.parametrize("address", [a for a in BLOCKED if a != "not-an-ip"])
def test_host_resolving_to_blocked_address_refused_before_connecting(tmp_path, address):
    calls: list[str] = []
    resolve = resolver_for({"evil.test": [address]}, calls)
    with pytest.raises(FetchError) as err:
        fetch("http://evil.test/m.bin", tmp_path / "m", policy=policy(), resolver=resolve, transport=NoConnect())
    assert err.value.reason == "blocked_address"
    assert calls == ["evil.test"]
    assert leftovers(tmp_path) == []


def test_every_resolved_address_is_checked(tmp_path):
    resolve = resolver_for({"mixed.test": [PUBLIC_IP, "10.0.0.1"]})
    with pytest.raises(FetchError) as err:
        fetch("https://mixed.test/m", tmp_path / "m", policy=policy(), resolver=resolve, transport=NoConnect())
    assert err.value.reason == "blocked_address"
    assert str(err.value).startswith("refusing https://mixed.test/m: host mixed.test is at a private address")
    assert "10.0.0.1" not in str(err.value)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.1.2.3", "a private address"),
        ("192.168.7.7", "a private address"),
        ("fd00::1", "a private address"),
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("0.0.0.0", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("100.64.0.1", "a non-public address"),
    ],
)
def test_a_refusal_names_the_host_and_the_kind_of_address_never_the_address(tmp_path, address, kind):
    resolve = resolver_for({"internal.corp.test": [address]})
    with pytest.raises(FetchError) as err:
        fetch(
            "https://internal.corp.test/m?sig=x",
            tmp_path / "m",
            policy=policy(),
            resolver=resolve,
            transport=NoConnect(),
        )
    message = str(err.value)
    assert f"host internal.corp.test is at {kind} " in message and "MMS_FETCH_ALLOW_HOSTS" in message
    assert address not in message and "sig=x" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://127.0.0.1:9/",
        "http://[::1]:9/",
    ],
)
def test_ip_literal_urls_refused_without_resolving(tmp_path, url):
    with pytest.raises(FetchError) as err:
        fetch(url, tmp_path / "m", policy=policy(), resolver=no_resolve, transport=NoConnect())
    assert err.value.reason == "blocked_address"


def test_odd_numeric_host_is_resolved_then_refused(tmp_path):
    # 2130706433 == 127.0.0.1; the system resolver parses it without any DNS query.
    with pytest.raises(FetchError) as err:
        fetch("http://2130706433/", tmp_path / "m", policy=policy(), transport=NoConnect())
    assert err.value.reason == "blocked_address"


def test_loopback_refused_with_real_server_never_contacted(tmp_path, serve):
    srv = serve({"/file": body(PAYLOAD)})
    with pytest.raises(FetchError) as err:
        fetch(f"http://127.0.0.1:{srv.port}/file", tmp_path / "m", policy=policy())
    assert err.value.reason == "blocked_address"
    assert srv.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://files.test/m.bin",
        "gopher://files.test/",
        "javascript:alert(1)",
    ],
)
def test_bad_scheme(tmp_path, url):
    with pytest.raises(FetchError) as err:
        fetch(url, tmp_path / "m", policy=policy(), resolver=no_resolve, transport=NoConnect())
    assert err.value.reason == "bad_scheme"


def test_dns_rebinding_uses_the_single_checked_answer(tmp_path, serve, loopback):
    srv = serve({"/file": body(PAYLOAD)})
    calls: list[str] = []
    # First answer public (passes the guard), any later answer loopback (must never be used).
    resolve = resolver_for({"rebind.test": [[PUBLIC_IP], ["127.0.0.1"]]}, calls)
    transport = loopback({PUBLIC_IP: srv.port})
    result = fetch(
        f"http://rebind.test:{srv.port}/file", tmp_path / "m", policy=policy(), resolver=resolve, transport=transport
    )
    assert result.sha256 == PAYLOAD_SHA
    assert calls == ["rebind.test"]  # resolved exactly once
    host_header = f"rebind.test:{srv.port}"
    assert transport.seen == [(PUBLIC_IP, host_header, "rebind.test")]  # pinned to checked IP
    assert srv.seen == [("/file", host_header)]


def test_resolver_called_once_per_hop(tmp_path, serve):
    srv = serve({})
    srv.routes["/start"] = redirect(f"http://b.test:{srv.port}/file")
    srv.routes["/file"] = body(PAYLOAD)
    calls: list[str] = []
    resolve = resolver_for({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]}, calls)
    pol = policy(allow_hosts={f"a.test:{srv.port}", f"B.TEST:{srv.port}"})
    fetch(f"http://a.test:{srv.port}/start", tmp_path / "m", policy=pol, resolver=resolve)
    assert calls == ["a.test", "b.test"]
    assert srv.seen == [("/start", f"a.test:{srv.port}"), ("/file", f"b.test:{srv.port}")]


# --- redirects ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, reason",
    [
        ("http://internal.test/secret", "blocked_address"),
        ("http://169.254.169.254/latest/meta-data/", "blocked_address"),
        ("http://[::ffff:10.0.0.1]/", "blocked_address"),
        ("file:///etc/passwd", "bad_scheme"),
        ("ftp://internal.test/x", "bad_scheme"),
    ],
)
def test_redirect_from_allowed_host_to_private_refused(tmp_path, serve, loopback, target, reason):
    srv = serve({"/start": redirect(target)})
    calls: list[str] = []
    resolve = resolver_for({"internal.test": ["10.0.0.1"]}, calls)
    transport = loopback()
    with pytest.raises(FetchError) as err:
        fetch(
            f"http://127.0.0.1:{srv.port}/start",
            tmp_path / "m",
            policy=policy(allow_hosts={f"127.0.0.1:{srv.port}"}),
            resolver=resolve,
            transport=transport,
        )
    assert err.value.reason == reason
    assert [s[0] for s in transport.seen] == ["127.0.0.1"]  # only the first hop connected
    assert calls in ([], ["internal.test"])
    assert leftovers(tmp_path) == []


def test_redirect_to_other_local_port_not_on_allow_list(tmp_path, serve):
    other = serve({"/admin": body(b"secret")})
    srv = serve({"/start": redirect(f"http://127.0.0.1:{other.port}/admin")})
    with pytest.raises(FetchError) as err:
        fetch(
            f"http://127.0.0.1:{srv.port}/start", tmp_path / "m", policy=policy(allow_hosts={f"127.0.0.1:{srv.port}"})
        )
    assert err.value.reason == "blocked_address"
    assert other.seen == []


def test_redirect_loop_stops(tmp_path, serve):
    srv = serve({"/loop": redirect("/loop", status=301)})
    with pytest.raises(FetchError) as err:
        fetch(
            f"http://127.0.0.1:{srv.port}/loop",
            tmp_path / "m",
            policy=policy(allow_hosts={"127.0.0.1"}, max_redirects=2),
        )
    assert err.value.reason == "too_many_redirects"
    assert len(srv.seen) == 3


def test_redirects_up_to_the_limit_are_followed(tmp_path, serve):
    srv = serve(
        {
            "/r1": redirect("/r2", 307),
            "/r2": redirect("/r3", 308),
            "/r3": redirect("/file", 303),
            "/file": body(PAYLOAD),
        }
    )
    url = f"http://127.0.0.1:{srv.port}/r1"
    result = fetch(url, tmp_path / "m", policy=policy(allow_hosts={"127.0.0.1"}))
    assert result.sha256 == PAYLOAD_SHA
    assert result.final_url == f"http://127.0.0.1:{srv.port}/file"
    with pytest.raises(FetchError) as err:
        fetch(url, tmp_path / "m2", policy=policy(allow_hosts={"127.0.0.1"}, max_redirects=2))
    assert err.value.reason == "too_many_redirects"


# --- successful fetch, allow-list, limits ----------------------------------------


def test_allow_list_permits_local_host_and_port(tmp_path, serve):
    srv = serve({"/file": body(PAYLOAD, headers=[("Content-Type", "application/x-tar")])})
    dest = tmp_path / "model.bin"
    result = fetch(
        f"http://127.0.0.1:{srv.port}/file",
        dest,
        policy=policy(allow_hosts={f"127.0.0.1:{srv.port}"}),
        expected_sha256=PAYLOAD_SHA.upper(),
    )
    assert dest.read_bytes() == PAYLOAD
    assert (result.path, result.size, result.sha256) == (dest, len(PAYLOAD), PAYLOAD_SHA)
    assert result.content_type == "application/x-tar"
    assert leftovers(tmp_path) == ["model.bin"]  # no temp file left behind


def test_allow_list_is_exact_on_port_and_case_insensitive_on_name(tmp_path, serve):
    srv = serve({"/file": body(PAYLOAD)})
    resolve = resolver_for({"files.example.test": ["127.0.0.1"]})
    url = f"http://FILES.Example.test:{srv.port}/file"
    fetch(url, tmp_path / "a", policy=policy(allow_hosts={"files.EXAMPLE.test"}), resolver=resolve)
    assert srv.seen[-1] == ("/file", f"files.example.test:{srv.port}")
    with pytest.raises(FetchError) as err:
        fetch(
            url,
            tmp_path / "b",
            resolver=resolve,
            policy=policy(allow_hosts={f"files.example.test:{srv.port + 1}", "example.test"}),
        )
    assert err.value.reason == "blocked_address"
    assert len(srv.seen) == 1


@pytest.mark.parametrize("with_length", [True, False])
def test_oversize_download_refused(tmp_path, serve, with_length):
    srv = serve({"/big": body(b"x" * 200_000, length=with_length)})
    dest = tmp_path / "m"
    dest.write_bytes(b"old")
    with pytest.raises(FetchError) as err:
        fetch(f"http://127.0.0.1:{srv.port}/big", dest, policy=policy(allow_hosts={"127.0.0.1"}, max_bytes=50_000))
    assert err.value.reason == "too_large"
    assert dest.read_bytes() == b"old"  # untouched
    assert leftovers(tmp_path) == ["m"]


@pytest.mark.parametrize("route", [stall, drip], ids=["stall", "drip"])
def test_timeouts_are_enforced(tmp_path, serve, route):
    srv = serve({"/slow": route})
    # stall trips the read timeout, drip (a byte every 20 ms) trips the overall deadline.
    pol = policy(allow_hosts={"127.0.0.1"}, read_timeout=0.3 if route is stall else 2, deadline=0.6)
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetch(f"http://127.0.0.1:{srv.port}/slow", tmp_path / "m", policy=pol)
    assert err.value.reason == "timeout"
    assert time.monotonic() - started < 3
    assert leftovers(tmp_path) == []


def test_wrong_sha256_fails_and_removes_partial_file(tmp_path, serve):
    srv = serve({"/file": body(PAYLOAD)})
    with pytest.raises(FetchError) as err:
        fetch(
            f"http://127.0.0.1:{srv.port}/file",
            tmp_path / "m",
            policy=policy(allow_hosts={"127.0.0.1"}),
            expected_sha256="0" * 64,
        )
    assert err.value.reason == "checksum_mismatch"
    assert "0" * 64 in str(err.value) and PAYLOAD_SHA in str(err.value)
    assert leftovers(tmp_path) == []


def test_malformed_expected_sha256(tmp_path):
    with pytest.raises(FetchError) as err:
        fetch("http://files.test/m", tmp_path / "m", expected_sha256="abc", resolver=no_resolve, transport=NoConnect())
    assert err.value.reason == "bad_checksum"


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_status(tmp_path, serve, status):
    srv = serve({"/x": body(b"err", status=status)})
    with pytest.raises(FetchError) as err:
        fetch(f"http://127.0.0.1:{srv.port}/x", tmp_path / "m", policy=policy(allow_hosts={"127.0.0.1"}))
    assert err.value.reason == "http_status"
    assert str(status) in str(err.value)


# --- secrets never leak ------------------------------------------------------------


@pytest.mark.parametrize(
    "path, kwargs, reason",
    [
        ("/file", {}, None),
        ("/missing", {}, "http_status"),
        ("/big", {"max_bytes": 10}, "too_large"),
        ("/slow", {"read_timeout": 0.3}, "timeout"),
        ("/file", {"expected_sha256": "0" * 64}, "checksum_mismatch"),
        ("/to-private", {}, "blocked_address"),
        ("/to-signed", {"max_redirects": 0}, "too_many_redirects"),
    ],
)
def test_query_string_never_in_messages_or_logs(tmp_path, serve, loopback, caplog, path, kwargs, reason):
    srv = serve(
        {
            "/file": body(PAYLOAD),
            "/big": body(PAYLOAD),
            "/slow": stall,
            "/to-private": redirect("http://10.0.0.1/x" + SECRET_QUERY),
            "/to-signed": redirect("/file" + SECRET_QUERY),
        }
    )
    caplog.set_level(logging.DEBUG)  # everything, httpx/httpcore included
    expected = kwargs.pop("expected_sha256", None)
    pol = policy(allow_hosts={"127.0.0.1"}, **kwargs)
    url = f"http://127.0.0.1:{srv.port}{path}{SECRET_QUERY}"
    messages = []
    try:
        fetch(url, tmp_path / "m", policy=pol, expected_sha256=expected, transport=loopback())
    except FetchError as exc:
        assert exc.reason == reason
        messages += [str(exc), repr(exc)]
        assert "?<redacted>" in str(exc)
    else:
        assert reason is None
    assert srv.seen[0][0] == path + SECRET_QUERY  # the real request did carry the query
    assert "fetch.start" in caplog.text
    assert ("fetch.failed" in caplog.text) == (reason is not None)
    for text in [*messages, caplog.text]:
        for secret in SECRETS:
            assert secret not in text


# --- https: pinned address, original name for SNI and certificate ----------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A throwaway CA and a leaf certificate for files.example.test."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mms test CA")])

    def builder(subject, public_key):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
        )

    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "files.example.test")])
    leaf = (
        builder(leaf_name, key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("files.example.test")]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (d / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return d


@pytest.fixture
def tls_server(serve, tls_files):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "leaf.pem", tls_files / "key.pem")
    sni: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: sni.append(name)
    srv = serve({"/file": body(PAYLOAD)}, tls=context)
    srv.sni = sni
    return srv


def test_https_pinned_with_original_name_for_sni_and_cert(tmp_path, tls_server, tls_files):
    calls: list[str] = []
    resolve = resolver_for({"files.example.test": ["127.0.0.1"]}, calls)
    pol = policy(allow_hosts={"files.example.test"}, ca_bundle=str(tls_files / "ca.pem"))
    result = fetch(f"https://files.example.test:{tls_server.port}/file", tmp_path / "m", policy=pol, resolver=resolve)
    assert result.sha256 == PAYLOAD_SHA
    assert calls == ["files.example.test"]
    assert tls_server.sni == ["files.example.test"]
    assert tls_server.seen == [("/file", f"files.example.test:{tls_server.port}")]


def test_https_untrusted_certificate_refused(tmp_path, tls_server):
    resolve = resolver_for({"files.example.test": ["127.0.0.1"]})
    with pytest.raises(FetchError) as err:
        fetch(
            f"https://files.example.test:{tls_server.port}/file",
            tmp_path / "m",
            policy=policy(allow_hosts={"files.example.test"}),
            resolver=resolve,
        )
    assert err.value.reason == "network_error"
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    assert tls_server.seen == []
    assert leftovers(tmp_path) == []


# --- PinnedTransport: the same rules for a client's own requests -------------------


def test_check_url_vets_without_connecting():
    resolve = resolver_for({"registry.test": [PUBLIC_IP], "inside.test": ["10.0.0.7"]})
    assert check_url("https://registry.test/v2/", policy=policy(), resolver=resolve) == PUBLIC_IP
    with pytest.raises(FetchError) as err:
        check_url("https://inside.test/v2/", policy=policy(), resolver=resolve)
    assert err.value.reason == "blocked_address"
    allowed = policy(allow_hosts={"inside.test"})
    assert check_url("https://inside.test/v2/", policy=allowed, resolver=resolve) == "10.0.0.7"


def test_pinned_transport_refuses_a_private_origin_before_connecting(serve):
    srv = serve({"/v2/": body(b"{}")})
    with httpx.Client(transport=PinnedTransport(policy()), trust_env=False) as client, pytest.raises(FetchError) as err:
        client.get(f"http://127.0.0.1:{srv.port}/v2/")
    assert err.value.reason == "blocked_address"
    assert srv.seen == []


def test_pinned_transport_resolves_each_origin_once_and_keeps_its_name(serve):
    srv = serve({"/a": body(b"a"), "/b": body(b"b")})
    calls: list[str] = []
    # A second lookup would answer a private address: it must never be asked for.
    resolve = resolver_for({"registry.test": [["127.0.0.1"], ["10.0.0.1"]]}, calls)
    transport = PinnedTransport(policy(allow_hosts={f"registry.test:{srv.port}"}), resolver=resolve)
    with httpx.Client(transport=transport, trust_env=False) as client:
        first = client.get(f"http://registry.test:{srv.port}/a")
        second = client.get(f"http://registry.test:{srv.port}/b")
    assert (first.text, second.text) == ("a", "b")
    assert str(second.url) == f"http://registry.test:{srv.port}/b"  # the caller's URL, not the IP
    assert calls == ["registry.test"]
    assert srv.seen == [("/a", f"registry.test:{srv.port}"), ("/b", f"registry.test:{srv.port}")]


def test_pinned_transport_vets_a_redirect_target_the_client_follows(serve):
    other = serve({"/admin": body(b"secret")})
    srv = serve({"/start": redirect(f"http://127.0.0.1:{other.port}/admin")})
    transport = PinnedTransport(policy(allow_hosts={f"127.0.0.1:{srv.port}"}))
    with (
        httpx.Client(transport=transport, trust_env=False, follow_redirects=True) as client,
        pytest.raises(FetchError) as err,
    ):
        client.get(f"http://127.0.0.1:{srv.port}/start")
    assert err.value.reason == "blocked_address"
    assert [path for path, _ in srv.seen] == ["/start"] and other.seen == []


def test_pinned_transport_checks_tls_against_the_original_name(tls_server, tls_files):
    resolve = resolver_for({"files.example.test": ["127.0.0.1"]})
    pol = policy(allow_hosts={"files.example.test"}, ca_bundle=str(tls_files / "ca.pem"))
    url = f"https://files.example.test:{tls_server.port}/file"
    with httpx.Client(transport=PinnedTransport(pol, resolver=resolve), trust_env=False) as client:
        assert client.get(url).content == PAYLOAD
    assert tls_server.sni == ["files.example.test"]
    untrusted = PinnedTransport(policy(allow_hosts={"files.example.test"}), resolver=resolve)
    with (
        httpx.Client(transport=untrusted, trust_env=False) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(url)


# --- transient failures: retried, and a broken download resumed ---------------------


LARGE = bytes(range(256)) * 2048  # 512 KiB
LARGE_SHA = hashlib.sha256(LARGE).hexdigest()


def flaky(*steps):
    """A route answering with each step once, the last one for good; records Range headers."""
    ranges: list[tuple[str | None, str | None]] = []

    def route(h: BaseHTTPRequestHandler) -> None:
        ranges.append((h.headers.get("Range"), h.headers.get("If-Range")))
        (steps[len(ranges) - 1] if len(ranges) <= len(steps) else steps[-1])(h)

    route.ranges = ranges
    return route


def cut_off(data: bytes, headers=()):
    """Promise all of ``data``, send a third of it, hang up."""

    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            h.send_header(key, value)
        h.end_headers()
        h.wfile.write(data[: len(data) // 3])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    return route


def ranged(data: bytes, etag: str):
    """Serve ``data``, or the asked-for tail of it (206) when If-Range matches."""

    def route(h: BaseHTTPRequestHandler) -> None:
        asked = h.headers.get("Range")
        if asked and h.headers.get("If-Range") == etag:
            start = int(asked.removeprefix("bytes=").rstrip("-"))
            part = data[start:]
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            part = data
            h.send_response(200)
        h.send_header("ETag", etag)
        h.send_header("Content-Length", str(len(part)))
        h.end_headers()
        h.wfile.write(part)

    return route


def test_5xx_and_a_dropped_connection_are_retried(tmp_path, serve):
    def hang_up(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    route = flaky(body(b"busy", status=503), hang_up, body(b"bad gateway", status=502), body(PAYLOAD))
    srv = serve({"/file": route})
    result = fetch(
        f"http://127.0.0.1:{srv.port}/file",
        tmp_path / "m",
        policy=policy(allow_hosts={"127.0.0.1"}),
        expected_sha256=PAYLOAD_SHA,
    )
    assert result.size == len(PAYLOAD)
    assert (tmp_path / "m").read_bytes() == PAYLOAD
    assert len(route.ranges) == 4
    assert leftovers(tmp_path) == ["m"]


def test_a_429_waits_for_its_retry_after(tmp_path, serve):
    route = flaky(body(b"slow down", status=429, headers=[("Retry-After", "1")]), body(PAYLOAD))
    srv = serve({"/file": route})
    started = time.monotonic()
    fetch(f"http://127.0.0.1:{srv.port}/file", tmp_path / "m", policy=policy(allow_hosts={"127.0.0.1"}))
    assert time.monotonic() - started >= 1.0
    assert len(route.ranges) == 2


def test_attempts_are_bounded_and_a_404_is_not_retried(tmp_path, serve):
    busy, missing = flaky(body(b"busy", status=503)), flaky(body(b"no", status=404))
    srv = serve({"/busy": busy, "/missing": missing})
    for path in ("/busy", "/missing"):
        with pytest.raises(FetchError) as err:
            fetch(
                f"http://127.0.0.1:{srv.port}{path}",
                tmp_path / "m",
                policy=policy(allow_hosts={"127.0.0.1"}, attempts=3),
            )
        assert err.value.reason == "http_status"
    assert len(busy.ranges) == 3 and len(missing.ranges) == 1
    assert leftovers(tmp_path) == []


def test_a_broken_download_resumes_with_range_where_it_stopped(tmp_path, serve):
    etag = '"v1"'
    route = flaky(cut_off(LARGE, headers=[("ETag", etag)]), ranged(LARGE, etag))
    srv = serve({"/model": route})
    result = fetch(
        f"http://127.0.0.1:{srv.port}/model",
        tmp_path / "m",
        policy=policy(allow_hosts={"127.0.0.1"}),
        expected_sha256=LARGE_SHA,
    )
    assert (tmp_path / "m").read_bytes() == LARGE and result.sha256 == LARGE_SHA
    first, second = route.ranges
    assert first == (None, None)
    assert second == (f"bytes={len(LARGE) // 3}-", etag)  # only the rest was asked for
    assert leftovers(tmp_path) == ["m"]


def test_a_changed_file_or_one_without_a_validator_is_downloaded_again_whole(tmp_path, serve):
    changed = LARGE[::-1]
    # The first answer's ETag no longer matches: the server sends the whole new file.
    moved_on = flaky(cut_off(LARGE, headers=[("ETag", '"v1"')]), ranged(changed, '"v2"'))
    no_validator = flaky(cut_off(LARGE), body(LARGE))
    srv = serve({"/moved-on": moved_on, "/plain": no_validator})
    fetch(f"http://127.0.0.1:{srv.port}/moved-on", tmp_path / "a", policy=policy(allow_hosts={"127.0.0.1"}))
    assert (tmp_path / "a").read_bytes() == changed
    fetch(f"http://127.0.0.1:{srv.port}/plain", tmp_path / "b", policy=policy(allow_hosts={"127.0.0.1"}))
    assert (tmp_path / "b").read_bytes() == LARGE
    assert no_validator.ranges == [(None, None), (None, None)]
    assert leftovers(tmp_path) == ["a", "b"]


def test_a_retry_after_that_is_not_ascii_digits_is_ignored_not_an_error() -> None:
    from mms_client.retrying import retry_after

    assert retry_after("\u00b2") is None  # str.isdigit() says yes; float() refuses it
    assert retry_after("3") == 3.0


# --- a resolver that does not answer -------------------------------------------------


def _hanging(release: threading.Event):
    def resolver(host, port, **_kwargs):
        release.wait(30)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, port))]

    return resolver


def _resolver_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith("resolve "))


def _until_no_resolver_threads() -> None:
    deadline = time.monotonic() + 5
    while _resolver_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _resolver_threads() == 0


def test_a_lookup_that_does_not_answer_ends_within_its_bound(monkeypatch):
    """getaddrinfo cannot be interrupted and the system resolver's own timeouts can pass a
    minute: the check gives up at RESOLVE_SECONDS with a timeout, which a fetch tries again."""
    from workers import fetcher

    monkeypatch.setattr(fetcher, "RESOLVE_SECONDS", 0.3)
    release = threading.Event()
    started = time.monotonic()
    try:
        with pytest.raises(FetchError) as err:
            check_url("https://slow.example/model.zip", policy=policy(), resolver=_hanging(release))
        assert time.monotonic() - started < 2
        assert err.value.reason == "timeout"
        assert "slow.example" in str(err.value) and "0.3 s" in str(err.value)
    finally:
        release.set()
    _until_no_resolver_threads()  # the lookup given up on ends when its resolver does


def test_lookups_given_up_on_hold_a_bounded_number_of_threads(monkeypatch):
    from workers import fetcher

    monkeypatch.setattr(fetcher, "RESOLVE_SECONDS", 0.2)
    monkeypatch.setattr(fetcher, "_lookups", threading.BoundedSemaphore(2))
    release = threading.Event()
    try:
        for _ in range(5):
            with pytest.raises(FetchError) as err:
                check_url("https://slow.example/", policy=policy(), resolver=_hanging(release))
            assert err.value.reason == "timeout"
        assert _resolver_threads() == 2  # the other three never started one
    finally:
        release.set()
    _until_no_resolver_threads()
    # Their slots are free again: a lookup that answers goes through.
    assert check_url("https://fine.example/", policy=policy(), resolver=_hanging(release)) == PUBLIC_IP


def test_a_resolver_error_is_still_a_resolve_failure():
    def failing(host, port, **_kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(FetchError) as err:
        check_url("https://nowhere.example/", policy=policy(), resolver=failing)
    assert err.value.reason == "resolve_failed"


def test_names_that_hang_do_not_use_up_the_lookups_others_need(monkeypatch):
    """A tenant whose DNS server never answers leaves lookups behind (each until the system
    resolver gives up); another tenant's name still resolves while 40 of them linger."""
    from workers import fetcher

    monkeypatch.setattr(fetcher, "RESOLVE_SECONDS", 0.05)
    release = threading.Event()
    try:
        for _ in range(40):
            with pytest.raises(FetchError):
                check_url("https://hangs.example/", policy=policy(), resolver=_hanging(release))
        assert _resolver_threads() == 40

        def answers(host, port, **_kwargs):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC_IP, port))]

        monkeypatch.setattr(fetcher, "RESOLVE_SECONDS", 2)
        assert check_url("https://fine.example/", policy=policy(), resolver=answers) == PUBLIC_IP
    finally:
        release.set()
    _until_no_resolver_threads()


def test_a_lookup_whose_thread_cannot_start_gives_its_slot_back(monkeypatch):
    """Under a pids limit a thread may not start: the lookup fails, and its slot is free again
    (from the review: it leaked, and enough of them stopped every lookup for good)."""
    from workers import fetcher

    monkeypatch.setattr(fetcher, "_lookups", threading.BoundedSemaphore(1))
    start = threading.Thread.start

    def refused(self):
        if self.name.startswith("resolve "):
            raise RuntimeError("can't start new thread")
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", refused)
    for _ in range(3):
        with pytest.raises(RuntimeError):
            check_url("https://fine.example/", policy=policy(), resolver=_hanging(threading.Event()))
    monkeypatch.setattr(threading.Thread, "start", start)
    release = threading.Event()
    release.set()
    assert check_url("https://fine.example/", policy=policy(), resolver=_hanging(release)) == PUBLIC_IP
