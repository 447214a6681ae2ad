"""The registry client under a fetch policy: a base image named by a tenant reaches no
private address, through its registry, its token realm or a blob redirect.

Real HTTP servers on 127.0.0.1 stand in for registries, token services and blob storage;
each records every request it gets, so "refused" means that nothing arrived.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workers.fetcher import FetchPolicy
from workers.oci.media import DOCKER_MANIFEST
from workers.oci.remote_registry import RemoteRegistryClient, RemoteRegistryError

CONFIG = b'{"architecture":"amd64","os":"linux"}'
CONFIG_DIGEST = f"sha256:{hashlib.sha256(CONFIG).hexdigest()}"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": CONFIG_DIGEST,
            "size": len(CONFIG),
        },
        "layers": [],
    }
).encode()
PASSWORD = "base-registry-secret-1234"

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.seen.append((self.command, self.path, self.headers.get("Host"), self.headers.get("Authorization")))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        (route or answer(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}'))(self)

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


def answer(status: int, data: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    return route


@pytest.fixture
def serve() -> Iterator[Callable[[dict[str, Route]], ThreadingHTTPServer]]:
    """Start recording HTTP servers on 127.0.0.1; all stop at teardown."""
    started = []

    def start(routes: dict[str, Route]) -> ThreadingHTTPServer:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.routes, srv.seen = routes, []
        srv.address = f"127.0.0.1:{srv.server_address[1]}"
        thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        started.append((srv, thread))
        return srv

    yield start
    for srv, thread in started:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def resolver_for(mapping: dict[str, list[list[str]]], calls: list[str]):
    """A getaddrinfo stand-in answering one list per call (the last one repeats)."""

    def resolve(host, port, *args, **kwargs):
        calls.append(host)
        answers = mapping[host]
        current = answers.pop(0) if len(answers) > 1 else answers[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in current]

    return resolve


def no_resolve(*args, **kwargs):
    raise AssertionError("resolver must not be called")


def manifest_routes(repository: str = "x/y") -> dict[str, Route]:
    manifest = answer(200, MANIFEST, (("Content-Type", DOCKER_MANIFEST),))
    return {f"/v2/{repository}/manifests/1": manifest, f"/v2/{repository}/blobs/{CONFIG_DIGEST}": answer(200, CONFIG)}


def test_a_base_on_a_loopback_port_is_refused_and_the_port_gets_nothing(serve) -> None:
    registry = serve(manifest_routes())
    with (
        RemoteRegistryClient(registry.address, policy=FetchPolicy(), resolver=no_resolve) as client,
        pytest.raises(RemoteRegistryError) as refused,
    ):
        client.get_manifest("x/y", "1")
    assert str(refused.value) == (
        f"registry {registry.address} is at a private address; ask the operator to allow it (MMS_FETCH_ALLOW_HOSTS)"
    )
    assert refused.value.code == "BLOCKED_ADDRESS"
    assert registry.seen == []


def test_a_name_that_resolves_privately_is_refused_without_showing_the_address() -> None:
    calls: list[str] = []
    resolve = resolver_for({"registry.corp.test": [["10.20.30.40"]]}, calls)
    with (
        RemoteRegistryClient(
            "registry.corp.test:5000", "user", PASSWORD, policy=FetchPolicy(), resolver=resolve
        ) as client,
        pytest.raises(RemoteRegistryError) as refused,
    ):
        client.get_manifest("x/y", "1")
    message = str(refused.value)
    assert "registry.corp.test:5000 is at a private address" in message
    assert "10.20.30.40" not in message and PASSWORD not in message
    assert calls == ["registry.corp.test"]


def test_the_policy_allow_list_and_no_policy_reach_a_loopback_registry(serve) -> None:
    registry = serve(manifest_routes())
    allowed = FetchPolicy(allow_hosts={registry.address})
    with RemoteRegistryClient(registry.address, policy=allowed) as client:
        assert client.get_manifest("x/y", "1").raw == MANIFEST
        assert client.get_blob("x/y", CONFIG_DIGEST) == CONFIG
    with RemoteRegistryClient(registry.address) as client:  # a caller that trusts the host
        assert client.get_manifest("x/y", "1").raw == MANIFEST
    assert [path for _, path, _, _ in registry.seen] == [
        "/v2/x/y/manifests/1",
        f"/v2/x/y/blobs/{CONFIG_DIGEST}",
        "/v2/x/y/manifests/1",
    ]


@pytest.mark.parametrize("login", [None, ("user", PASSWORD)], ids=["anonymous", "login"])
def test_a_token_realm_on_another_loopback_port_is_refused(serve, login) -> None:
    token_service = serve({"/token": answer(200, b'{"token": "t"}')})
    challenge = f'Bearer realm="http://{token_service.address}/token",service="registry"'
    registry = serve({"/v2/x/y/manifests/1": answer(401, b"", (("WWW-Authenticate", challenge),))})
    policy = FetchPolicy(allow_hosts={registry.address})
    with (
        RemoteRegistryClient(registry.address, *(login or ()), policy=policy) as client,
        pytest.raises(RemoteRegistryError) as refused,
    ):
        client.get_manifest("x/y", "1")
    assert str(refused.value) == (
        f"the token service {token_service.address} of registry "
        f"{registry.address} is at a private address; ask the operator "
        "to allow it (MMS_FETCH_ALLOW_HOSTS)"
    )
    assert token_service.seen == []
    assert [path for _, path, _, _ in registry.seen] == ["/v2/x/y/manifests/1"]


def test_an_allowed_token_realm_is_asked_on_the_address_it_was_checked_at(serve) -> None:
    token_service = serve({"/token": answer(200, b'{"token": "t"}')})
    port = token_service.server_address[1]
    challenge = f'Bearer realm="http://auth.registry.test:{port}/token",service="registry"'
    routes = manifest_routes()
    manifest = routes["/v2/x/y/manifests/1"]

    def needs_token(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") == "Bearer t":
            manifest(h)
        else:
            answer(401, b"", (("WWW-Authenticate", challenge),))(h)

    routes["/v2/x/y/manifests/1"] = needs_token
    registry = serve(routes)
    calls: list[str] = []
    resolve = resolver_for({"auth.registry.test": [["127.0.0.1"], ["10.0.0.1"]]}, calls)
    policy = FetchPolicy(allow_hosts={registry.address, "auth.registry.test"})
    with RemoteRegistryClient(registry.address, policy=policy, resolver=resolve) as client:
        assert client.get_manifest("x/y", "1").raw == MANIFEST
    assert calls == ["auth.registry.test"]
    [(_, path, host, _)] = token_service.seen
    assert path.startswith("/token?") and host == f"auth.registry.test:{port}"


def test_a_blob_redirect_to_another_loopback_port_is_refused(serve) -> None:
    storage = serve({"/blob": answer(200, CONFIG)})
    signed = f"http://{storage.address}/blob?sig=SIGNATURE-SECRET"
    registry = serve({f"/v2/x/y/blobs/{CONFIG_DIGEST}": answer(307, b"", (("Location", signed),))})
    policy = FetchPolicy(allow_hosts={registry.address})
    with RemoteRegistryClient(registry.address, policy=policy) as client, pytest.raises(RemoteRegistryError) as refused:
        client.get_blob("x/y", CONFIG_DIGEST)
    message = str(refused.value)
    assert message == (
        f"the blob storage {storage.address} of registry {registry.address} is at "
        "a private address; ask the operator to allow it (MMS_FETCH_ALLOW_HOSTS)"
    )
    assert storage.seen == []
    assert len(registry.seen) == 1


def test_a_blob_redirect_to_allowed_storage_is_followed_without_registry_credentials(serve) -> None:
    storage = serve({"/blob": answer(200, CONFIG)})
    registry = serve(
        {f"/v2/x/y/blobs/{CONFIG_DIGEST}": answer(307, b"", (("Location", f"http://{storage.address}/blob?sig=s"),))}
    )
    policy = FetchPolicy(allow_hosts={registry.address, storage.address})
    with RemoteRegistryClient(registry.address, policy=policy) as client:
        assert client.get_blob("x/y", CONFIG_DIGEST) == CONFIG
    assert storage.seen == [("GET", "/blob?sig=s", storage.address, None)]


def test_a_registry_name_is_resolved_once_and_every_request_pinned(serve) -> None:
    registry = serve(manifest_routes())
    port = registry.server_address[1]
    calls: list[str] = []
    # Rebinding: any later lookup would answer a private address that is not allowed.
    resolve = resolver_for({"registry.example.test": [["127.0.0.1"], ["10.0.0.1"]]}, calls)
    policy = FetchPolicy(allow_hosts={f"registry.example.test:{port}"})
    with RemoteRegistryClient(
        f"registry.example.test:{port}", insecure=True, policy=policy, resolver=resolve
    ) as client:
        client.get_manifest("x/y", "1")
        client.get_blob("x/y", CONFIG_DIGEST)
        assert client.blob_size("x/y", CONFIG_DIGEST) == len(CONFIG)
    assert calls == ["registry.example.test"]
    assert {host for _, _, host, _ in registry.seen} == {f"registry.example.test:{port}"}
    assert len(registry.seen) == 3
