"""tests/registry_proxy.CountingProxy in front of the real open registry (scripts/infra)."""

from __future__ import annotations

import hashlib
import io
import os
import resource
import tarfile
from collections.abc import Iterator

import httpx
import pytest

from tests.infra import Infra
from tests.registry_proxy import CountingProxy


@pytest.fixture
def proxy(infra: Infra) -> Iterator[CountingProxy]:
    with CountingProxy(infra.registry, upstream_timeout=60) as running:
        yield running


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as http:
        yield http


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def start_upload(client: httpx.Client, proxy: CountingProxy, repo: str) -> str:
    answer = client.post(f"http://{proxy.address}/v2/{repo}/blobs/uploads/")
    assert answer.status_code == 202, answer.text
    return answer.headers["Location"]


def with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def test_a_monolithic_upload_is_counted_with_its_bytes(infra, proxy, client):
    repo, data = f"{infra.prefix}/proxy-mono", os.urandom(3_000_000)

    location = start_upload(client, proxy, repo)
    put = client.put(
        with_digest(location, digest_of(data)), content=data, headers={"Content-Type": "application/octet-stream"}
    )

    assert location.startswith(f"http://{proxy.address}/v2/{repo}/blobs/uploads/")
    assert put.status_code == 201, put.text
    assert put.headers["Docker-Content-Digest"] == digest_of(data)
    stats = proxy.stats()
    assert (stats.blob_uploads, stats.upload_bytes, stats.mounts, stats.manifest_puts) == (1, len(data), 0, 0)
    assert [(r.method, r.status, r.request_bytes) for r in stats.requests] == [
        ("POST", 202, 0),
        ("PUT", 201, len(data)),
    ]
    assert stats.requests[0].path == f"/v2/{repo}/blobs/uploads/"
    # The blob really is in the registry behind the proxy.
    direct = client.get(f"http://{infra.registry}/v2/{repo}/blobs/{digest_of(data)}")
    assert direct.content == data


def test_head_and_get_are_not_uploads(infra, proxy, client):
    repo, data = f"{infra.prefix}/proxy-head", os.urandom(100_000)
    location = start_upload(client, proxy, repo)
    client.put(with_digest(location, digest_of(data)), content=data).raise_for_status()
    proxy.reset()

    blob = f"http://{proxy.address}/v2/{repo}/blobs/{digest_of(data)}"
    head = client.head(blob)
    got = client.get(blob)
    missing = client.head(f"http://{proxy.address}/v2/{repo}/blobs/{digest_of(b'nothing')}")

    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(data))  # passed through, no body sent
    assert got.content == data
    assert missing.status_code == 404
    stats = proxy.stats()
    assert (stats.blob_uploads, stats.upload_bytes, stats.downloaded_bytes) == (0, 0, len(data))
    assert [(r.method, r.status) for r in stats.requests] == [("HEAD", 200), ("GET", 200), ("HEAD", 404)]


def test_a_chunked_patch_upload_counts_its_bytes(infra, proxy, client):
    repo = f"{infra.prefix}/proxy-chunked"
    pieces = [os.urandom(size) for size in (1, 65_536, 1_000_003, 17, 2_500_000)]
    data = b"".join(pieces)

    location = start_upload(client, proxy, repo)
    patch = client.patch(
        location,
        content=iter(pieces),  # no length: chunked
        headers={"Content-Type": "application/octet-stream"},
    )
    assert patch.request.headers["Transfer-Encoding"] == "chunked"
    assert patch.status_code == 202, patch.text
    assert patch.headers["Range"] == f"0-{len(data) - 1}"
    put = client.put(with_digest(patch.headers["Location"], digest_of(data)))

    assert put.status_code == 201, put.text
    stats = proxy.stats()
    assert (stats.blob_uploads, stats.upload_bytes) == (1, len(data))
    assert [(r.method, r.status, r.request_bytes) for r in stats.requests] == [
        ("POST", 202, 0),
        ("PATCH", 202, len(data)),
        ("PUT", 201, 0),
    ]
    direct = client.get(f"http://{infra.registry}/v2/{repo}/blobs/{digest_of(data)}")
    assert direct.content == data


def test_a_cross_repository_mount_is_counted_as_a_mount(infra, proxy, client):
    source, target = f"{infra.prefix}/proxy-from", f"{infra.prefix}/proxy-to"
    data = os.urandom(50_000)
    location = start_upload(client, proxy, source)
    client.put(with_digest(location, digest_of(data)), content=data).raise_for_status()
    proxy.reset()

    mount = client.post(
        f"http://{proxy.address}/v2/{target}/blobs/uploads/", params={"mount": digest_of(data), "from": source}
    )

    assert mount.status_code == 201, mount.text
    assert mount.headers["Location"].startswith(f"http://{proxy.address}/v2/{target}/blobs/")
    stats = proxy.stats()
    assert (stats.mounts, stats.blob_uploads, stats.upload_bytes) == (1, 0, 0)


def test_a_large_body_is_streamed_through(infra, proxy, client):
    repo, piece, count = f"{infra.prefix}/proxy-large", os.urandom(1 << 20), 120
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(piece)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    location = start_upload(client, proxy, repo)
    put = client.put(
        with_digest(location, f"sha256:{digest.hexdigest()}"),
        content=(piece for _ in range(count)),
        headers={"Content-Length": str(count * len(piece))},
    )

    assert put.status_code == 201, put.text
    assert proxy.stats().upload_bytes == count * len(piece)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown < 40 * 1024, f"the proxy held the body: peak RSS grew {grown} KiB"


def test_an_upstream_that_is_down_is_a_502(client):
    with CountingProxy("127.0.0.1:9", upstream_timeout=5) as proxy:  # discard port: refused
        answer = client.get(f"http://{proxy.address}/v2/")
        assert answer.status_code == 502
        assert [(r.method, r.status) for r in proxy.stats().requests] == [("GET", 502)]


def tiny_image_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        payload = os.urandom(300_000)  # incompressible: the pushed layer is about this size
        info = tarfile.TarInfo("payload.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_docker_push_goes_through_the_proxy(infra, proxy):
    repo, other = f"{infra.prefix}/proxy-push", f"{infra.prefix}/proxy-push-again"
    image, copy = f"{proxy.address}/{repo}:1", f"{proxy.address}/{other}:1"
    with infra.api() as api:
        image_id = api.import_image_from_data(tiny_image_tar(), repository=f"{proxy.address}/{repo}", tag="1")
        infra.local_images.append(image)
        assert image_id

        def push(name: str, reference: str) -> str:
            aux = {}
            for chunk in api.push(name, tag="1", stream=True, decode=True, auth_config={}):
                assert "error" not in chunk, chunk
                aux = chunk.get("aux") or aux
            infra.pushed.append((infra.registry, reference, aux["Digest"]))
            return aux["Digest"]

        push(f"{proxy.address}/{repo}", repo)
        first = proxy.stats()
        proxy.reset()
        push(f"{proxy.address}/{repo}", repo)
        again = proxy.stats()
        proxy.reset()
        api.tag(image, f"{proxy.address}/{other}", "1")
        infra.local_images.append(copy)
        push(f"{proxy.address}/{other}", other)
        elsewhere = proxy.stats()

    # The layer (docker streams it as a chunked PATCH) and the config, then the manifest.
    assert (first.blob_uploads, first.manifest_puts, first.mounts) == (2, 1, 0)
    assert 300_000 < first.upload_bytes < 400_000
    assert any(r.method == "PATCH" and r.request_bytes > 300_000 for r in first.requests)
    # Nothing to upload the second time; the manifest is put again.
    assert (again.blob_uploads, again.upload_bytes, again.manifest_puts) == (0, 0, 1)
    # Into another repository of the same registry, the engine mounts instead of uploading.
    assert elsewhere.mounts >= 1
    assert elsewhere.blob_uploads + elsewhere.mounts == 2
    assert elsewhere.manifest_puts == 1
