"""DockerBuilder and smoke_test against the real engine and registries (scripts/infra)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import tarfile
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.infra import TEST_LABEL, Infra
from workers.build_context import RegistryCredentials
from workers.builders import BuildFailed, BuildResult
from workers.builders.docker import BASE_DIGEST_LABEL, DockerBuilder
from workers.smoke_test import SmokeTestFailed, smoke_test

SUM_SCORE = """\
import json, os

def init():
    import six  # from the requirements
    global weights
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "weights.txt")) as f:
        weights = f.read()
    print("init ok, six", six.__version__, "weights", weights)

def run(data):
    return {"sum": sum(json.loads(data)["x"])}
"""

BROKEN_INIT = """\
def init():
    raise RuntimeError("model file is corrupt")

def run(data):
    return data
"""


def build(infra: Infra, builder: DockerBuilder, spec, repo: str, tag: str, log) -> BuildResult:
    """Build and push, recording what to clean up."""
    try:
        result = builder.build_and_push(spec, f"{infra.prefix}/{repo}", tag, log)
    finally:
        infra.local_images.append(f"{builder.registry}/{infra.prefix}/{repo}:{tag}")
    infra.pushed.append((builder.registry, f"{infra.prefix}/{repo}", result.digest))
    return result


def push_base(infra: Infra, reference: str, dockerfile: str) -> None:
    """Build ``dockerfile`` (no context files, no network) as ``reference`` and push it."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile.encode()))
    context.seek(0)
    repository, _, tag = reference.rpartition(":")
    with infra.api() as api:
        chunks = list(
            api.build(fileobj=context, custom_context=True, tag=reference, decode=True, network_mode="none", rm=True)
        )
        assert not [c for c in chunks if "error" in c], chunks
        infra.local_images.append(reference)
        pushed = list(api.push(repository, tag=tag, stream=True, decode=True))
        assert not [c for c in pushed if "error" in c], pushed


@contextlib.contextmanager
def serving(infra: Infra, image: str) -> Iterator[str]:
    """Run ``image`` on a free loopback port; yield its base URL once GET / answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with infra.api() as api:
        cid = api.create_container(
            image,
            environment={"PORT": str(port), "HOST": "127.0.0.1"},
            labels={TEST_LABEL: "1"},
            host_config=api.create_host_config(network_mode="host"),
        )["Id"]
        try:
            api.start(cid)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, api.logs(cid).decode()
                time.sleep(0.2)
            yield url
        finally:
            api.remove_container(cid, force=True, v=True)


def cached_steps(log: list[str]) -> dict[str, bool]:
    """Map each build step's instruction to whether the engine took it from its cache."""
    steps: dict[str, bool] = {}
    current = None
    for line in log:
        match = re.match(r"Step \d+/\d+ : (.*)", line)
        if match:
            current = match[1]
            steps[current] = False
        elif current and "Using cache" in line:
            steps[current] = True
    return steps


def test_built_image_pulled_back_from_the_registry_scores(infra, make_spec, log_lines):
    spec = make_spec(
        SUM_SCORE, models={"sum/1/weights.txt": b"w1"}, pip_requirements="six\n", labels={"org.mms.model.sum": "1"}
    )
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)

    result = build(infra, builder, spec, "sum", "1", log_lines.append)

    assert result.image_location == f"{infra.registry}/{infra.prefix}/sum:1"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", result.digest)
    assert result.size_bytes > 50_000_000
    smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=60)
    assert any("init ok, six" in line for line in log_lines)

    by_digest = f"{infra.registry}/{infra.prefix}/sum@{result.digest}"
    with infra.api() as api:
        # noprune: keep the untagged parent layers, the build cache of the other tests.
        api.remove_image(result.image_location, force=True, noprune=True)
        for chunk in api.pull(by_digest, stream=True, decode=True, auth_config={}):
            assert "error" not in chunk
        labels = api.inspect_image(by_digest)["Config"]["Labels"]
    infra.local_images.append(by_digest)
    assert labels["org.mms.model.sum"] == "1"
    assert labels[BASE_DIGEST_LABEL] == result.base_image_digest
    with serving(infra, by_digest) as url:
        answer = httpx.post(url + "/score", content=json.dumps({"x": [1, 2, 3.5]}), timeout=10)
    assert answer.status_code == 200
    assert answer.json() == {"sum": 6.5}


def test_init_that_raises_fails_the_smoke_test_with_its_traceback(infra, make_spec, log_lines):
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)
    result = build(infra, builder, make_spec(BROKEN_INIT), "broken", "1", log_lines.append)

    with pytest.raises(SmokeTestFailed) as failed:
        smoke_test(infra.docker_host, result.image_location, log_lines.append, timeout=60)

    assert "exited with code 1" in failed.value.message
    assert "RuntimeError: model file is corrupt" in failed.value.message
    assert "Traceback (most recent call last)" in failed.value.logs
    assert any("RuntimeError: model file is corrupt" in line for line in log_lines)
    assert log_lines[-1].startswith("mms: smoke test failed")
    with infra.api() as api:  # the smoke test's container is gone (another run's may not be)
        assert not api.containers(all=True, filters={"label": "org.mms.smoke-test", "ancestor": result.image_location})


def test_requirement_that_does_not_exist_fails_naming_it(infra, make_spec, log_lines):
    spec = make_spec(SUM_SCORE, pip_requirements="six\nthis-package-does-not-exist-mms==1.0\n")
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)

    with pytest.raises(BuildFailed) as failed:
        build(infra, builder, spec, "missing", "1", log_lines.append)

    assert failed.value.step == "requirements"
    assert "this-package-does-not-exist-mms==1.0" in failed.value.message
    assert "\n" not in str(failed.value)
    assert "this-package-does-not-exist-mms==1.0" in log_lines[-1]  # the log ends with why


def test_conda_only_package_without_conda_in_the_base_fails_naming_it(infra, make_spec, log_lines):
    conda = "name: env\ndependencies:\n  - python=3.11\n  - pip\n  - numpy=1.26\n  - pip:\n    - six\n"
    spec = make_spec(SUM_SCORE, conda_file=conda)
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)

    with pytest.raises(BuildFailed) as failed:
        build(infra, builder, spec, "conda", "1", log_lines.append)

    assert failed.value.step == "environment"
    assert "numpy=1.26" in failed.value.message
    assert "no conda" in failed.value.message


@pytest.fixture(scope="module")
def private_base(infra: Infra) -> str:
    """A copy of the base image in the password registry, absent from the engine."""
    image = f"{infra.auth_registry}/{infra.prefix}/base"
    with infra.api() as api:
        api.tag(infra.base_image, image, "py3.11")
        chunks = api.push(image, tag="py3.11", stream=True, decode=True, auth_config=infra.basic_auth())
        chunks = list(chunks)  # read to the end: the engine reports errors in the stream
        assert not [c for c in chunks if "error" in c], chunks
        digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c)
        api.remove_image(f"{image}:py3.11")
    infra.pushed.append((infra.auth_registry, f"{infra.prefix}/base", digest))
    infra.local_images.append(f"{image}:py3.11")  # pulled again by the builds with credentials
    return f"{image}:py3.11"


def test_private_base_image_needs_its_credentials(infra, make_spec, private_base, log_lines):
    builder = DockerBuilder(
        infra.docker_host, infra.auth_registry, infra.basic_auth(), timeout=300, **infra.build_networking
    )
    wrong = RegistryCredentials(infra.auth_registry, infra.username, "not-the-password")

    with pytest.raises(BuildFailed) as anonymous:
        build(infra, builder, make_spec(SUM_SCORE, base_image=private_base), "p", "1", log_lines.append)
    with pytest.raises(BuildFailed) as refused:
        build(
            infra,
            builder,
            make_spec(SUM_SCORE, base_image=private_base, base_registry=wrong),
            "p",
            "1",
            log_lines.append,
        )
    good = RegistryCredentials(infra.auth_registry, infra.username, infra.password)
    result = build(
        infra, builder, make_spec(BROKEN_INIT, base_image=private_base, base_registry=good), "p", "1", log_lines.append
    )

    assert anonymous.value.step == "pull-base"
    assert "requires authentication" in anonymous.value.message
    assert infra.auth_registry in anonymous.value.message
    assert refused.value.step == "pull-base"
    assert "refused the credentials" in refused.value.message
    assert result.image_location.startswith(f"{infra.auth_registry}/")  # pushed with auth too
    assert any("with credentials" in line for line in log_lines)
    assert not [line for line in log_lines if infra.password in line]
    assert infra.password not in str(anonymous.value) + str(refused.value) + repr(good)


def test_push_without_credentials_is_refused_in_the_stream(infra, make_spec, private_base, log_lines):
    # The base is in the same registry, read with the tenant's login; only the push lacks one.
    builder = DockerBuilder(infra.docker_host, infra.auth_registry, None, timeout=300, **infra.build_networking)
    good = RegistryCredentials(infra.auth_registry, infra.username, infra.password)

    with pytest.raises(BuildFailed) as failed:
        build(
            infra,
            builder,
            make_spec(BROKEN_INIT, base_image=private_base, base_registry=good),
            "nocreds",
            "1",
            log_lines.append,
        )

    assert failed.value.step == "push"
    assert "requires authentication" in failed.value.message


def test_credentials_for_another_registry_are_not_sent(infra, make_spec, log_lines):
    other = RegistryCredentials("elsewhere.example:5000", infra.username, infra.password)
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)

    with pytest.raises(BuildFailed) as failed:
        build(infra, builder, make_spec(BROKEN_INIT, base_registry=other), "x", "1", log_lines.append)

    assert failed.value.step == "pull-base"
    assert "elsewhere.example:5000" in failed.value.message


def test_new_model_version_reuses_every_layer_above_the_models(infra, make_spec, log_lines):
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)
    # Weights of this run's own: the engine's cache must not hold a models layer for them.
    run = uuid.uuid4().hex.encode()
    first = make_spec(SUM_SCORE, models={"sum/1/weights.txt": b"w1-" + run}, pip_requirements="six\n")
    second_log: list[str] = []
    second = make_spec(SUM_SCORE, models={"sum/1/weights.txt": b"w2-" + run}, pip_requirements="six\n")

    one = build(infra, builder, first, "cache", "1", log_lines.append)
    started = time.monotonic()
    two = build(infra, builder, second, "cache", "2", second_log.append)
    warm_seconds = time.monotonic() - started

    steps = list(cached_steps(second_log).items())
    models = next(i for i, (step, _) in enumerate(steps) if step.startswith("COPY models/"))
    pip_steps = [cached for step, cached in steps if "pip install" in step and " -r " in step]
    assert pip_steps == [True]
    assert all(cached for _, cached in steps[1:models]), steps  # steps[0] is FROM
    assert not steps[models][1]
    assert one.digest != two.digest
    assert warm_seconds < 60


def test_a_base_from_another_registry_is_copied_in_and_the_engine_pulls_only_the_copy(
    infra, make_spec, private_base, log_lines
):
    # The engine would resolve the base's registry again and follow its redirects unchecked:
    # the worker copies the base into the build's own repository and the engine pulls that.
    builder = DockerBuilder(infra.docker_host, infra.registry, None, timeout=300, **infra.build_networking)
    good = RegistryCredentials(infra.auth_registry, infra.username, infra.password)
    wrong = RegistryCredentials(infra.auth_registry, infra.username, "not-the-password")

    with pytest.raises(BuildFailed) as refused:
        build(
            infra,
            builder,
            make_spec(BROKEN_INIT, base_image=private_base, base_registry=wrong),
            "mirrored",
            "1",
            log_lines.append,
        )
    result = build(
        infra,
        builder,
        make_spec(BROKEN_INIT, base_image=private_base, base_registry=good),
        "mirrored",
        "1",
        log_lines.append,
    )

    assert refused.value.step == "pull-base"
    assert infra.auth_registry in refused.value.message
    assert infra.password not in refused.value.message
    pulls = [line for line in log_lines if line.startswith("mms: pulling base image")]
    assert pulls and all(
        line.startswith(f"mms: pulling base image {infra.registry}/{infra.prefix}/mirrored@sha256:") for line in pulls
    )
    base = result.base_image_digest
    infra.pushed.append((infra.registry, f"{infra.prefix}/mirrored", base))
    infra.local_images.append(f"{infra.registry}/{infra.prefix}/mirrored@{base}")
    assert base and pulls[-1].endswith(f"@{base}")
    built_from = [line for line in log_lines if line.lstrip().startswith("FROM ")]
    assert built_from[-1].strip() == f"FROM {infra.registry}/{infra.prefix}/mirrored@{base}"
    assert any(
        line.startswith(f"mms: copying base image {private_base} into the service's registry with credentials")
        for line in log_lines
    )
    with httpx.Client() as http:  # copied by digest: no tag for the base in the build's repo
        tags = http.get(f"http://{infra.registry}/v2/{infra.prefix}/mirrored/tags/list").json()
    assert tags["tags"] == ["1"]
