"""The oci builder against the real registries: reproducible, incremental, and honest about
what it cannot do. Running and scoring an oci-built image is proven end to end, through the
API, in tests/workers/test_image_builds.py."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.infra import Infra
from tests.registry_proxy import CountingProxy
from workers.build_context import BuildSpec, RegistryCredentials
from workers.builders import BuildFailed
from workers.builders.oci import CACHE_REPOSITORY, OciBuilder
from workers.oci.media import DOCKER_MANIFEST, OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST
from workers.oci.remote_registry import RemoteRegistryClient

SCORE = "import six\n\ndef init():\n    pass\n\ndef run(raw):\n    return raw\n"
REQUIREMENTS = "six==1.17.0\n"


def _builder(infra: Infra, tmp_path: Path, registry: str | None = None, name: str = "w") -> OciBuilder:
    # A fresh registry prefix and cache folder: a worker that has never built anything.
    registry = registry or f"{infra.registry}/{infra.prefix}-{uuid.uuid4().hex[:6]}"
    return OciBuilder(registry, cache_dir=tmp_path / f"cache-{name}")


def _manifest(registry: str, repository: str, reference: str) -> dict:
    with RemoteRegistryClient(registry) as client:
        return client.get_manifest(repository, reference).body


def _image(builder: OciBuilder, spec: BuildSpec, repo: str, tag: str, log: list[str]):
    return builder.build_and_push(spec, repo, tag, log.append)


def test_the_same_inputs_give_the_same_digest_on_two_fresh_workers(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    spec = make_spec(
        SCORE,
        models={"m/1/model.bin": b"weights" * 1000},
        pip_requirements=REQUIREMENTS,
        labels={"org.mms.manifest.id": "m-1"},
    )
    first = _image(_builder(infra, tmp_path, name="a"), spec, "repro/img", "1", log_lines)
    second = _image(_builder(infra, tmp_path, name="b"), spec, "repro/img", "7", log_lines)
    assert first.digest == second.digest  # another tag, another worker, another prefix
    assert first.image_location.endswith("/repro/img:1")
    registry, _, repo = first.image_location.rpartition(":")[0].partition("/")
    manifest = _manifest(registry, repo, first.digest)
    assert manifest["mediaType"] == DOCKER_MANIFEST  # the base image's family
    assert len(manifest["layers"]) == 1 + 5  # base, then user, deps, server, driver, models
    with RemoteRegistryClient(registry) as client:
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))
    assert len(config["history"]) == len(config["rootfs"]["diff_ids"]) == 6
    assert config["config"]["Cmd"] == ["/opt/mms/bin/start"]
    assert config["config"]["Labels"]["org.mms.manifest.id"] == "m-1"
    assert "5001/tcp" in config["config"]["ExposedPorts"]


def test_a_new_model_version_uploads_only_its_layer_a_config_and_a_manifest(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    with CountingProxy(infra.registry) as proxy:
        builder = _builder(infra, tmp_path, registry=f"{proxy.address}/{infra.prefix}-{uuid.uuid4().hex[:6]}")
        first = make_spec(SCORE, models={"m/1/model.bin": b"one" * 50_000}, pip_requirements=REQUIREMENTS)
        _image(builder, first, "incr/img", "1", log_lines)
        assert any("installing" in line for line in log_lines)
        proxy.reset()
        log_lines.clear()
        second = make_spec(
            SCORE, models={"m/2/model.bin": b"two" * 50_000}, pip_requirements=REQUIREMENTS, app_dir=first.app_dir
        )
        _image(builder, second, "incr/img", "2", log_lines)
        stats = proxy.stats()
    assert not any("installing" in line for line in log_lines)  # the environment came from the registry
    assert any("dependency layer cached" in line for line in log_lines)
    assert stats.blob_uploads == 2  # the model layer and the config
    assert stats.manifest_puts == 1 and stats.mounts == 0
    # Compressed while it was uploaded (POST, one streamed PATCH, PUT), not written to disk first.
    model_line = next(line for line in log_lines if "uploaded model files" in line)
    model_layer = int(re.search(r"\((\d+) bytes\)", model_line)[1])
    assert model_layer < stats.upload_bytes < model_layer + 20_000  # plus the config, no more


def test_a_no_change_rebuild_compresses_and_uploads_nothing_and_another_image_mounts(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    with CountingProxy(infra.registry) as proxy:
        builder = _builder(infra, tmp_path, registry=f"{proxy.address}/{infra.prefix}-{uuid.uuid4().hex[:6]}")
        spec = make_spec(SCORE, models={"m/1/model.bin": b"same" * 100_000}, pip_requirements=REQUIREMENTS)
        first = _image(builder, spec, "same/img", "1", log_lines)
        proxy.reset()
        log_lines.clear()
        again = _image(builder, spec, "same/img", "2", log_lines)
        unchanged = proxy.stats()
        rebuild_log = list(log_lines)
        proxy.reset()
        other = _image(builder, spec, "other/img", "1", log_lines)
        elsewhere = proxy.stats()
    assert first.digest == again.digest == other.digest
    # The layers' tars hashed to known digests: nothing compressed, nothing sent but a manifest.
    assert not [line for line in rebuild_log if "uploaded" in line and "0 bytes uploaded" not in line]
    assert (unchanged.blob_uploads, unchanged.upload_bytes, unchanged.manifest_puts) == (0, 0, 1)
    # Another repository gets the known new layers (user, dependencies, server, driver,
    # models) by cross-repository mount; only the base, read from another host here, and the
    # config (a few hundred bytes) are uploaded.
    assert elsewhere.mounts == 5 and elsewhere.blob_uploads == 2


def test_an_oci_base_gives_an_oci_image_and_an_index_is_resolved_to_linux_amd64(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    prefix = f"{infra.prefix}-oci"
    host, _, base_path = infra.base_image.partition("/")
    base_repo, _, base_tag = base_path.rpartition(":")
    with RemoteRegistryClient(host) as client:
        docker_manifest = client.get_manifest(base_repo, base_tag)
        body = docker_manifest.body
        # The same blobs under OCI media types, then an index that points at it.
        oci = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {**body["config"], "mediaType": OCI_CONFIG},
            "layers": [{**layer, "mediaType": OCI_LAYER} for layer in body["layers"]],
        }
        repo = f"{prefix}/mms/base-oci"
        for blob in [body["config"], *body["layers"]]:
            client.push_blob(repo, blob["digest"], blob["size"], lambda: iter(()), mount_from=base_repo)
        raw = json.dumps(oci).encode()
        digest = client.put_manifest(repo, "amd64", raw, OCI_MANIFEST)
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": digest,
                    "size": len(raw),
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
        client.put_manifest(repo, "multi", json.dumps(index).encode(), OCI_INDEX)
    builder = OciBuilder(f"{host}/{prefix}", cache_dir=tmp_path / "cache")
    spec = make_spec(SCORE, base_image=f"{host}/{repo}:multi", pip_requirements=REQUIREMENTS)
    result = _image(builder, spec, "ocibase/img", "1", log_lines)
    assert result.base_image_digest == digest
    manifest = _manifest(host, f"{prefix}/ocibase/img", result.digest)
    assert manifest["mediaType"] == OCI_MANIFEST and manifest["config"]["mediaType"] == OCI_CONFIG
    assert {layer["mediaType"] for layer in manifest["layers"]} == {OCI_LAYER}
    with infra.api() as api:  # the engine accepts it
        location = result.image_location
        for _ in api.pull(location.rpartition(":")[0], tag="1", stream=True, decode=True):
            pass
        infra.local_images.append(location)
        assert api.inspect_image(location)["Config"]["Cmd"] == ["/opt/mms/bin/start"]


def test_a_base_that_declares_a_volume_is_refused(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path
) -> None:
    """A VOLUME would give the smoke test's container a volume its disk limit does not count."""
    prefix = f"{infra.prefix}-volume"
    host, _, base_path = infra.base_image.partition("/")
    base_repo, _, base_tag = base_path.rpartition(":")
    repo = f"{prefix}/mms/base-volume"
    with RemoteRegistryClient(host) as client:
        body = client.get_manifest(base_repo, base_tag).body
        config = json.loads(client.get_blob(base_repo, body["config"]["digest"]))
        config["config"]["Volumes"] = {"/data": {}}
        raw_config = json.dumps(config).encode()
        config_digest = "sha256:" + hashlib.sha256(raw_config).hexdigest()
        client.push_blob(repo, config_digest, len(raw_config), lambda: iter([raw_config]))
        for layer in body["layers"]:
            client.push_blob(repo, layer["digest"], layer["size"], lambda: iter(()), mount_from=base_repo)
        manifest = {**body, "config": {**body["config"], "digest": config_digest, "size": len(raw_config)}}
        client.put_manifest(repo, "1", json.dumps(manifest).encode(), body.get("mediaType") or DOCKER_MANIFEST)
    builder = OciBuilder(f"{host}/{prefix}", cache_dir=tmp_path / "cache")
    spec = make_spec(SCORE, base_image=f"{host}/{repo}:1")
    with pytest.raises(BuildFailed) as failed:
        builder.build_and_push(spec, "volume/img", "1", lambda _: None)
    assert failed.value.step == "pull-base"
    assert "declares volumes (/data)" in failed.value.message and "without VOLUME" in failed.value.message


def test_a_failing_run_step_fails_the_build_naming_it_and_its_exit_code(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    # RUN steps run by buildah, contained: tests/workers/builders/test_oci_run_steps.py.
    builder = _builder(infra, tmp_path)
    run = make_spec(SCORE, extra_dockerfile_steps="ENV A=1\nRUN echo failing-$A && exit 3")
    with pytest.raises(BuildFailed) as failed:
        _image(builder, run, "refused/img", "1", log_lines)
    assert failed.value.step == "extra-steps"
    assert "RUN echo failing-$A && exit 3" in failed.value.message and "exited with code 3" in failed.value.message
    assert "failing-1" in log_lines
    # Conda packages build without a container: tests/workers/builders/test_oci_conda.py.


def test_env_label_and_expose_steps_become_config_and_a_conda_pip_list_installs(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    builder = _builder(infra, tmp_path)
    spec = make_spec(
        SCORE,
        conda_file="dependencies:\n  - python=3.11\n  - pip\n  - pip:\n    - six==1.17.0\n",
        extra_dockerfile_steps='ENV MODE=fast "GREETING=hello world"\nLABEL team=ml\nEXPOSE 9000',
    )
    result = _image(builder, spec, "steps/img", "1", log_lines)
    registry, _, repo = result.image_location.rpartition(":")[0].partition("/")
    with RemoteRegistryClient(registry) as client:
        manifest = client.get_manifest(repo, result.digest).body
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))["config"]
        deps = manifest["layers"][-3]
        with client.open_blob(repo, deps["digest"]) as chunks:
            data = gzip.decompress(b"".join(chunks))
    assert "MODE=fast" in config["Env"] and "GREETING=hello world" in config["Env"]
    assert config["Labels"]["team"] == "ml" and "9000/tcp" in config["ExposedPorts"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert "opt/mms/site-packages/six.py" in tar.getnames()


def test_a_private_base_needs_its_login_which_never_shows(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    # The open registry's base, copied into the password registry through the client itself.
    host, _, base_path = infra.base_image.partition("/")
    base_repo, _, base_tag = base_path.rpartition(":")
    private_repo = f"{infra.prefix}/oci-private-base"
    with (
        RemoteRegistryClient(host) as source,
        RemoteRegistryClient(infra.auth_registry, infra.username, infra.password) as dest,
    ):
        manifest = source.get_manifest(base_repo, base_tag)
        for blob in [manifest.body["config"], *manifest.body["layers"]]:

            def body(digest=blob["digest"]):
                with source.open_blob(base_repo, digest) as chunks:
                    yield from chunks

            dest.push_blob(private_repo, blob["digest"], blob["size"], body)
        digest = dest.put_manifest(private_repo, "py3.11", manifest.raw, manifest.media_type)
    infra.pushed.append((infra.auth_registry, private_repo, digest))
    base = f"{infra.auth_registry}/{private_repo}:py3.11"
    builder = _builder(infra, tmp_path)
    with pytest.raises(BuildFailed) as failed:
        _image(builder, make_spec(SCORE, base_image=base), "private/img", "1", log_lines)
    assert failed.value.step == "pull-base" and "authentication" in failed.value.message
    wrong = RegistryCredentials(infra.auth_registry, infra.username, "not-the-password-123")
    with pytest.raises(BuildFailed) as failed:
        _image(builder, make_spec(SCORE, base_image=base, base_registry=wrong), "private/img", "1", log_lines)
    assert "refused" in failed.value.message and "not-the-password-123" not in failed.value.message
    right = RegistryCredentials(infra.auth_registry, infra.username, infra.password)
    result = _image(
        builder,
        make_spec(SCORE, base_image=base, base_registry=right, pip_requirements=REQUIREMENTS),
        "private/img",
        "1",
        log_lines,
    )
    assert result.base_image_digest == digest
    assert not [line for line in log_lines if infra.password in line or "not-the-password-123" in line]
    # The base layers were copied across registries into the image's repository.
    registry, _, repo = result.image_location.rpartition(":")[0].partition("/")
    with httpx.Client() as client:
        for layer in manifest.body["layers"]:
            assert client.head(f"http://{registry}/v2/{repo}/blobs/{layer['digest']}").status_code == 200


def test_the_dependency_cache_lives_in_the_registry(
    infra: Infra, make_spec: Callable[..., BuildSpec], tmp_path: Path, log_lines: list[str]
) -> None:
    registry = f"{infra.registry}/{infra.prefix}-{uuid.uuid4().hex[:6]}"
    spec = make_spec(SCORE, pip_requirements=REQUIREMENTS)
    _image(OciBuilder(registry, cache_dir=tmp_path / "one"), spec, "cache/img", "1", log_lines)
    host, _, prefix = registry.partition("/")
    with httpx.Client() as client:
        tags = client.get(f"http://{host}/v2/{prefix}/{CACHE_REPOSITORY}/tags/list").json()["tags"]
    assert len(tags) == 1 and len(tags[0]) == 64
    log_lines.clear()
    _image(OciBuilder(registry, cache_dir=tmp_path / "two"), spec, "cache/img", "2", log_lines)
    assert not any("installing" in line for line in log_lines)  # a second worker, no local cache
