"""The docker builder in the real engine: extra steps written anew keep their meaning (the
continuation joins, ENV expands like the engine's own, labels and ports land in the config),
the build is FROM the digest it pulled, and a base with ONBUILD triggers is refused."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from tests.infra import Infra
from tests.workers.builders.test_docker_builder import build, push_base
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.docker import DockerBuilder

SCORE = "def init():\n    pass\n\ndef run(data):\n    return data\n"
STEPS = """\
# comments and blank lines are dropped

run echo "joined:" one \\
    # a comment inside the continuation
    two && \\\t
    echo "greeting=$GREETING"
ENV GREETING="hello world" EXTRA_PATH=/opt/x:$PATH
ARG STAMP=7
RUN ["sh", "-c", "echo exec-form $STAMP"]
LABEL team=ml "org.example/owner"=ana
EXPOSE 9000 53/udp
"""


def test_accepted_steps_mean_in_the_engine_what_they_say(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    builder = DockerBuilder(infra.docker_host, infra.registry, **infra.build_networking)
    # A step of its own first: the engine's cache from an earlier run must not skip the others.
    steps = f"RUN echo run-{uuid.uuid4().hex}\n{STEPS}"
    result = build(infra, builder, make_spec(SCORE, extra_dockerfile_steps=steps), "steps", "1", log_lines.append)
    log = "\n".join(log_lines)
    assert "joined: one two" in log  # the continuation joined, the comment inside it dropped
    assert "greeting=" in [line.strip() for line in log_lines]  # GREETING is set only after
    assert "exec-form 7" in log  # the build argument reaches an exec-form step
    with infra.api() as api:
        config = api.inspect_image(result.image_location)["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["GREETING"] == "hello world"
    assert env["EXTRA_PATH"].startswith("/opt/x:/opt/mms/venv/bin:")  # $PATH expanded by the engine
    assert config["Labels"]["team"] == "ml" and config["Labels"]["org.example/owner"] == "ana"
    assert {"9000/tcp", "53/udp"} <= set(config["ExposedPorts"])
    # The engine saw only the lines the builder wrote: one per step, none of the tenant's text.
    assert 'RUN ["/bin/sh", "-c", "echo \\"joined:\\" one     two &&     echo' in log


def test_the_build_is_from_the_digest_pulled_and_a_base_with_onbuild_triggers_is_refused(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    builder = DockerBuilder(infra.docker_host, infra.registry, **infra.build_networking)
    build(infra, builder, make_spec(SCORE), "pinned", "1", log_lines.append)
    repository = infra.base_image.rpartition(":")[0]
    assert any(line.strip().startswith(f"FROM {repository}@sha256:") for line in log_lines)

    # A base whose ONBUILD would run a COPY --from (any image in the engine) in our build.
    trigger = f"{infra.registry}/{infra.prefix}/onbuild-base"
    push_base(
        infra,
        f"{trigger}:1",
        f"FROM {infra.base_image}\nONBUILD COPY --from={infra.base_image} /etc/hostname /stolen\n",
    )
    log_lines.clear()
    with pytest.raises(BuildFailed) as failed:
        build(infra, builder, make_spec(SCORE, base_image=f"{trigger}:1"), "onbuild", "1", log_lines.append)
    assert failed.value.step == "pull-base" and "ONBUILD" in failed.value.message
    assert not any("stolen" in line and "Step" in line for line in log_lines)
