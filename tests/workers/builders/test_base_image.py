"""publish_base_image against the real engine and the open registry."""

from __future__ import annotations

from datetime import date

import httpx

from workers.base_image import publish_base_image

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def test_publish_imports_the_rootfs_and_pushes_dated_and_moving_tags(infra, log_lines):
    registry = f"{infra.registry}/{infra.prefix}"

    reference = publish_base_image(registry, infra.rootfs_tar, "3.11.2", log_lines.append,
                                   docker_host=infra.docker_host, today=date(2030, 1, 2))

    repo = f"{infra.prefix}/mms/inference-base"
    assert reference == f"{infra.registry}/{repo}:py3.11-20300102"
    infra.local_images += [reference, f"{infra.registry}/{repo}:py3.11"]
    digests = []
    with httpx.Client(timeout=10) as client:
        for tag in ("py3.11-20300102", "py3.11"):
            answer = client.head(f"http://{infra.registry}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": MANIFEST_V2})
            assert answer.status_code == 200
            digests.append(answer.headers["Docker-Content-Digest"])
    assert digests[0] == digests[1]
    infra.pushed.append((infra.registry, repo, digests[0]))
    with infra.api() as api:
        config = api.inspect_image(reference)["Config"]
    assert config["Labels"]["org.mms.python"] == "3.11.2"
    assert config["Cmd"] == ["python3"]
    assert any(line.startswith("mms: pushed") for line in log_lines)
