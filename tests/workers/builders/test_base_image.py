"""publish_base_image, daemonless, into the open registry (then pulled and run by the engine)
and into the service's own image store."""

from __future__ import annotations

import json
from datetime import date

import httpx

from app.image_store.oci_layout import OciLayout
from workers.base_image import publish_base_image
from workers.oci.image_store_client import ImageStoreClient
from workers.oci.remote_registry import RemoteRegistryClient

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_publish_pushes_dated_and_moving_tags_that_the_engine_runs(infra, log_lines):
    registry = f"{infra.registry}/{infra.prefix}"
    with RemoteRegistryClient(infra.registry) as store:
        reference = publish_base_image(
            store, registry, infra.rootfs_tar, "3.11.2", log_lines.append, today=date(2030, 1, 2)
        )

    repo = f"{infra.prefix}/mms/inference-base"
    assert reference == f"{infra.registry}/{repo}:py3.11-20300102"
    infra.local_images += [reference]
    digests = []
    with httpx.Client(timeout=10) as client:
        for tag in ("py3.11-20300102", "py3.11", "latest"):  # bookworm's cpu base is also latest
            answer = client.head(f"http://{infra.registry}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
            assert answer.status_code == 200
            digests.append(answer.headers["Docker-Content-Digest"])
    assert digests[0] == digests[1] == digests[2]
    infra.pushed.append((infra.registry, repo, digests[0]))
    with infra.api() as api:
        for _ in api.pull(reference, stream=True, decode=True):
            pass
        config = api.inspect_image(reference)["Config"]
        container = api.create_container(
            reference,
            command=["python3", "-c", "import ssl, sys; print(sys.version_info[:2])"],
            labels={"org.mms.test": "1"},
            host_config=api.create_host_config(network_mode="host"),
        )
        api.start(container)
        assert api.wait(container, timeout=60)["StatusCode"] == 0
        printed = api.logs(container).decode()
        api.remove_container(container, force=True)
    assert "(3, 11)" in printed
    # Labelled with what its layers hold (images built FROM it inherit these: builds read the layers).
    assert config["Labels"]["org.mms.python"] == "3.11.2"
    assert config["Labels"]["org.mms.libc"] == "glibc-2.36"
    assert config["Labels"]["org.mms.debian-release"] == "bookworm"
    assert config["Cmd"] == ["python3"]
    assert any(line.startswith("mms: pushed") for line in log_lines)


def test_publish_into_the_service_store_twice_uploads_nothing_the_second_time(infra, tmp_path, log_lines):
    layout = OciLayout(tmp_path / "images")
    with ImageStoreClient(layout, "127.0.0.1:8000") as store:
        first = publish_base_image(
            store, "127.0.0.1:8000", infra.rootfs_tar, "3.11", log_lines.append, today=date(2030, 1, 2)
        )
        assert "mms: layer uploaded" in log_lines
        log_lines.clear()
        again = publish_base_image(
            store, "127.0.0.1:8000", infra.rootfs_tar, "3.11", log_lines.append, today=date(2030, 1, 2)
        )
    assert first == again == "127.0.0.1:8000/mms/inference-base:py3.11-20300102"
    assert "mms: layer present" in log_lines
    assert layout.tags("mms/inference-base") == ["latest", "py3.11", "py3.11-20300102"]
    manifest = json.loads(layout.blob_path(layout.resolve("mms/inference-base", "py3.11").digest).read_bytes())
    assert manifest["mediaType"] == OCI_MANIFEST and len(manifest["layers"]) == 1
