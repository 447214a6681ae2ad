"""Both builders check a base image's registry against the fetch policy before reading or
pulling from it; their own registry needs no allow-listing. End to end through the API:
tests/workers/test_image_builds.py."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.infra import Infra
from tests.listeners import recording_http_server
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.docker import DockerBuilder
from workers.builders.oci import OciBuilder
from workers.fetch_policy import allowing_registry
from workers.fetcher import FetchPolicy

SCORE = "def init():\n    pass\n\ndef run(raw):\n    return raw\n"
ALLOW_HINT = "ask the operator to allow it (MMS_FETCH_ALLOW_HOSTS)"


@pytest.fixture
def listening() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on a loopback port that records every request."""
    with recording_http_server() as server:
        yield server


def _spec(tmp_path: Path, base_image: str) -> BuildSpec:
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    (app / "score.py").write_text(SCORE)
    return BuildSpec(base_image=base_image, driver_program="score.py", app_dir=app)


def _resolver(mapping: dict[str, str]) -> Callable[..., list]:
    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (mapping[host], port))]

    return resolve


def test_the_own_registry_is_allowed_on_its_port_only() -> None:
    policy = allowing_registry(FetchPolicy(allow_hosts={"store.corp"}), "127.0.0.1:5000/prefix")
    assert policy.allow_hosts == {"store.corp", "127.0.0.1:5000"}
    assert allowing_registry(FetchPolicy(), "Registry.Local").allow_hosts == {"registry.local:443", "registry.local:80"}
    assert allowing_registry(FetchPolicy(), "[::1]:5000").allow_hosts == {"[::1]:5000"}


def test_the_oci_builder_refuses_a_base_at_a_private_address_before_any_request(
    tmp_path: Path, listening: ThreadingHTTPServer
) -> None:
    # The builder's own registry is another port of the same address: that is no licence.
    builder = OciBuilder("127.0.0.1:9/prefix", cache_dir=tmp_path / "cache", policy=FetchPolicy())
    log: list[str] = []
    with pytest.raises(BuildFailed) as failed:
        builder.build_and_push(_spec(tmp_path, f"{listening.address}/x/y:1"), "a/img", "1", log.append)
    assert failed.value.step == "pull-base"
    assert failed.value.message == (f"registry {listening.address} is at a private address; {ALLOW_HINT}")
    assert listening.seen == []
    assert log[-1] == f"mms: build failed at step pull-base: {failed.value.message}"


def test_the_oci_builder_reads_an_allow_listed_base_registry(tmp_path: Path, listening: ThreadingHTTPServer) -> None:
    policy = FetchPolicy(allow_hosts={listening.address})
    builder = OciBuilder("127.0.0.1:9/prefix", cache_dir=tmp_path / "cache", policy=policy)
    with pytest.raises(BuildFailed) as failed:
        builder.build_and_push(_spec(tmp_path, f"{listening.address}/x/y:1"), "a/img", "1", lambda line: None)
    assert "not found" in failed.value.message  # it asked, and the registry had no such image
    assert listening.seen == ["/v2/x/y/manifests/1"]


@pytest.mark.parametrize(
    "base, shown",
    [
        ("{address}/x/y:1", "{address}"),
        ("Localhost/x/y:1", "Localhost"),  # the engine takes a capitalised first part as a host
    ],
)
def test_the_docker_builder_refuses_a_base_at_a_private_address_before_the_engine_pulls(
    infra: Infra, tmp_path: Path, listening: ThreadingHTTPServer, base: str, shown: str
) -> None:
    builder = DockerBuilder(
        infra.docker_host, infra.registry, timeout=300, policy=FetchPolicy(), **infra.build_networking
    )
    log: list[str] = []
    with pytest.raises(BuildFailed) as failed:
        builder.build_and_push(
            _spec(tmp_path, base.format(address=listening.address)), f"{infra.prefix}/refused", "1", log.append
        )
    assert failed.value.step == "pull-base"
    assert failed.value.message == (
        f"base image registry {shown.format(address=listening.address)} is at a private address; {ALLOW_HINT}"
    )
    assert listening.seen == []
    assert not [line for line in log if line.startswith("mms: pulling base image")]


def test_the_docker_builder_checks_docker_hub_by_its_registry_name(infra: Infra, tmp_path: Path) -> None:
    resolve = _resolver({"registry-1.docker.io": "10.1.2.3"})  # as a hostile resolver might
    builder = DockerBuilder(
        infra.docker_host, infra.registry, timeout=300, policy=FetchPolicy(), **infra.build_networking, resolver=resolve
    )
    log: list[str] = []
    with pytest.raises(BuildFailed) as failed:
        builder.build_and_push(_spec(tmp_path, "python:3.11-slim"), f"{infra.prefix}/hub", "1", log.append)
    assert failed.value.message == (f"base image registry docker.io is at a private address; {ALLOW_HINT}")
    assert "10.1.2.3" not in "\n".join(log)
    assert not [line for line in log if line.startswith("mms: pulling base image")]


def test_the_docker_builder_pulls_from_its_own_registry_without_listing_it(infra: Infra, tmp_path: Path) -> None:
    builder = DockerBuilder(
        infra.docker_host, infra.registry, timeout=300, policy=FetchPolicy(), **infra.build_networking
    )
    log: list[str] = []
    with infra.api() as api:
        pulled, digest = builder._pull_base(api, _spec(tmp_path, infra.base_image), f"{infra.prefix}/own", log.append)
    assert pulled == infra.base_image
    assert digest and digest.startswith("sha256:")
    assert log[0] == f"mms: pulling base image {infra.base_image}"


class _RedirectingRegistry(BaseHTTPRequestHandler):
    """A registry that has the image's manifest and sends every blob to ``blob_url``."""

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": f"sha256:{hashlib.sha256(config).hexdigest()}",
                    "size": len(config),
                },
                "layers": [],
            }
        ).encode()
        if "/manifests/" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(manifest)))
            self.end_headers()
            self.wfile.write(manifest)
            return
        self.send_response(307)
        self.send_header("Location", self.server.blob_url)  # type: ignore[attr-defined]
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args: object) -> None:
        pass


def test_the_docker_builder_does_not_follow_a_base_registry_to_a_private_address(
    infra: Infra, tmp_path: Path, listening: ThreadingHTTPServer
) -> None:
    # The registry is allow-listed; the blob storage it redirects to is not. The engine
    # followed such a redirect on the host network; the worker's copy refuses it.
    registry = ThreadingHTTPServer(("127.0.0.1", 0), _RedirectingRegistry)
    registry.seen, registry.blob_url = [], f"http://{listening.address}/stolen"
    thread = threading.Thread(target=registry.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    address = f"127.0.0.1:{registry.server_address[1]}"
    try:
        builder = DockerBuilder(
            infra.docker_host,
            infra.registry,
            timeout=300,
            policy=FetchPolicy(allow_hosts={address}),
            **infra.build_networking,
        )
        log: list[str] = []
        with pytest.raises(BuildFailed) as failed:
            builder.build_and_push(_spec(tmp_path, f"{address}/x/y:1"), f"{infra.prefix}/redirected", "1", log.append)
    finally:
        registry.shutdown()
        registry.server_close()
        thread.join(5)
    assert failed.value.step == "pull-base"
    assert "private address" in failed.value.message, failed.value.message
    assert "/v2/x/y/manifests/1" in registry.seen  # the copy asked the allowed registry
    assert listening.seen == []  # and went nowhere else
    assert not [line for line in log if line.startswith("mms: pulling base image")]
