"""The docker builder's RUN steps are a tenant's code in the engine: each limit stops a step
that passes it, and the build error names the limit (workers/builders/run_limits.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest

from tests.infra import Infra
from tests.workers.builders.test_docker_builder import build, push_base
from workers.build_context import BuildSpec
from workers.builders import BuildFailed
from workers.builders.docker import DockerBuilder
from workers.builders.run_limits import RunLimits

SCORE = "def init():\n    pass\n\ndef run(data):\n    return data\n"

MEMORY_HOG = "RUN python3 -c \"exec('x = []\\\\nwhile True: x.append(bytearray(16 << 20))')\""
# The same, slow enough for the watch to know its container when the limit is hit.
SLOW_MEMORY_HOG = (
    "RUN python3 -c \"exec('import time\\\\nx = []\\\\nwhile True: x.append(bytearray(16 << 20)); time.sleep(0.15)')\""
)
# Each process forks, children too (2**12 at most): the forks past the limit fail and the
# processes then wait, so only the limit ends the step, well before its own sleep would.
FORK_BOMB = (
    "RUN python3 -c \"exec('import os, time\\\\nfor _ in range(12):\\\\n    try: os.fork()\\\\n"
    "    except OSError: break\\\\ntime.sleep(120)')\""
)
# 1 MB a file, with pauses: a writer the watch sees while it writes.
SLOW_WRITER = (
    "RUN i=0; while [ $i -lt 400 ]; do dd if=/dev/zero of=/fill$i bs=1M count=1 "
    "2>/dev/null; i=$((i+1)); sleep 0.02; done; echo wrote-all"
)
# Faster than any look at it: caught from the layers it left, before the push.
FAST_WRITERS = (
    "RUN dd if=/dev/zero of=/fill-a bs=1M count=40 2>/dev/null\n"
    "RUN dd if=/dev/zero of=/fill-b bs=1M count=40 2>/dev/null"
)
SLEEPER = "RUN sleep 300"
SPINNER = "RUN python3 -c 'while True: pass'"


def builder_with(infra: Infra, **limits: int) -> DockerBuilder:
    return DockerBuilder(
        infra.docker_host, infra.registry, timeout=300, run_limits=RunLimits(**limits), **infra.build_networking
    )


def failed_build(infra: Infra, builder: DockerBuilder, spec: BuildSpec, repo: str, log: list[str]) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(BuildFailed) as failed:
        build(infra, builder, spec, repo, "1", log.append)
    assert failed.value.step.startswith("extra-steps"), failed.value.step
    return failed.value.message, time.monotonic() - started


def assert_no_step_container_left(infra: Infra) -> None:
    with infra.api() as api:
        left = [c for c in api.containers(all=True) if c.get("Command", "").startswith("/bin/sh -c")]
        assert not left, left


@pytest.mark.parametrize(
    ("steps", "limits", "reason"),
    [
        (
            SLOW_MEMORY_HOG,
            {"memory_mb": 128},
            "a RUN step ran out of its memory limit of 128 MB (MMS_BUILD_RUN_MEMORY_MB)",
        ),
        (
            MEMORY_HOG,
            {"memory_mb": 128},
            (
                "a RUN step was killed (exit code 137), most likely by its memory limit of 128 MB "
                "(MMS_BUILD_RUN_MEMORY_MB)"
            ),
        ),
        (
            FORK_BOMB,
            {"pids": 64},
            "a RUN step reached its process limit of 64 processes and threads (MMS_BUILD_RUN_PIDS)",
        ),
        (
            SLOW_WRITER,
            {"disk_mb": 100},
            "the RUN steps wrote more than their disk limit of 100 MB (MMS_BUILD_RUN_DISK_MB)",
        ),
        (SLEEPER, {"seconds": 5}, "the RUN steps ran longer than their time limit of 5 s (MMS_BUILD_RUN_SECONDS)"),
        (
            SPINNER,
            {"cpu_seconds": 3},
            "the RUN steps used more than their CPU time limit of 3 s (MMS_BUILD_RUN_CPU_SECONDS)",
        ),
    ],
    ids=["memory", "memory-fast", "processes", "disk", "time", "cpu"],
)
def test_a_run_step_past_a_limit_is_stopped_and_the_error_names_the_limit(
    infra: Infra,
    make_spec: Callable[..., BuildSpec],
    log_lines: list[str],
    steps: str,
    limits: dict[str, int],
    reason: str,
) -> None:
    builder = builder_with(infra, **limits)
    spec = make_spec(SCORE, extra_dockerfile_steps=steps)

    message, seconds = failed_build(infra, builder, spec, f"limit-{next(iter(limits))}", log_lines)

    assert message == reason
    assert seconds < 90  # the limit stopped it, not the step's own end (sleep 120 / 300)
    assert "wrote-all" not in log_lines
    assert_no_step_container_left(infra)


def test_writes_too_fast_to_watch_are_counted_from_the_layers_and_nothing_is_pushed(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    builder = builder_with(infra, disk_mb=60)
    spec = make_spec(SCORE, extra_dockerfile_steps=FAST_WRITERS)

    message, _ = failed_build(infra, builder, spec, "limit-layers", log_lines)

    # Seen while the second step wrote, or only from the layers: either way, named.
    assert message.endswith("more than their disk limit of 60 MB (MMS_BUILD_RUN_DISK_MB)")
    assert not any(line.startswith("mms: pushing") for line in log_lines)


def test_steps_within_the_limits_build_and_carry_no_limit_into_the_image(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    builder = builder_with(infra, memory_mb=256, pids=64, disk_mb=60, seconds=120)
    steps = (
        f"RUN echo {uuid.uuid4().hex} && dd if=/dev/zero of=/fill bs=1M count=20 2>/dev/null && "
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null; true"
    )
    result = build(
        infra, builder, make_spec(SCORE, extra_dockerfile_steps=steps), "limit-within", "1", log_lines.append
    )

    assert result.digest.startswith("sha256:")
    assert str(256 << 20) in log_lines  # the step ran under the memory limit


def test_a_step_that_prints_another_containers_id_neither_touches_it_nor_escapes_the_watch(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    # Another build's step container, as a tenant could guess one running in the engine.
    with infra.api() as api:
        victim = api.create_container(infra.base_image, command=["sleep", "120"], labels={"org.mms.test": "victim"})[
            "Id"
        ]
        api.start(victim)
        try:
            steps = f"RUN echo ' ---> Running in {victim[:12]}'; echo ' ---> Running in {victim}'; sleep 300"
            builder = builder_with(infra, seconds=5, pids=64)
            message, seconds = failed_build(
                infra, builder, make_spec(SCORE, extra_dockerfile_steps=steps), "limit-spoof", log_lines
            )
            state = api.inspect_container(victim)
        finally:
            api.remove_container(victim, force=True)

    assert message == "the RUN steps ran longer than their time limit of 5 s (MMS_BUILD_RUN_SECONDS)"
    assert seconds < 90
    assert state["State"]["Running"]  # not killed
    assert not state["HostConfig"].get("PidsLimit")  # and not limited


def test_a_base_with_a_volume_is_refused_since_its_writes_escape_the_disk_limit(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    base = f"{infra.registry}/{infra.prefix}/volume-base"
    push_base(infra, f"{base}:1", f"FROM {infra.base_image}\nVOLUME /data\n")

    with pytest.raises(BuildFailed) as failed:
        build(infra, builder_with(infra), make_spec(SCORE, base_image=f"{base}:1"), "volume", "1", log_lines.append)

    assert failed.value.step == "pull-base"
    assert failed.value.message == (
        "the base image declares volumes (/data), whose writes would "
        "escape the build's disk limit: build on an image without VOLUME"
    )


def test_a_flood_of_running_in_lines_does_not_slow_the_watch(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    # 200,000 lines that look like the engine's, then a step that writes past the limit.
    steps = (
        "RUN i=0; while [ $i -lt 200000 ]; do echo ' ---> Running in 0123456789ab'; "
        "i=$((i+1)); done; dd if=/dev/zero of=/fill bs=1M count=200 2>/dev/null; sleep 300"
    )
    builder = builder_with(infra, disk_mb=100)

    message, seconds = failed_build(
        infra, builder, make_spec(SCORE, extra_dockerfile_steps=steps), "limit-flood", log_lines
    )

    assert message == "the RUN steps wrote more than their disk limit of 100 MB (MMS_BUILD_RUN_DISK_MB)"
    assert seconds < 90


def test_disk_reserved_out_of_a_containers_sight_is_refused_by_the_engine(
    infra: Infra, make_spec: Callable[..., BuildSpec], log_lines: list[str]
) -> None:
    # fallocate --keep-size reserves blocks for a file that stays empty: no size the watch
    # reads shows them. The engine's seccomp profile (docker/engine-seccomp.json) refuses it.
    steps = (
        f"RUN echo {uuid.uuid4().hex} && fallocate -l 10M /counted && "
        "touch /reserved && if fallocate -n -l 200M /reserved; then echo keep-size-allowed; "
        "else echo keep-size-refused; fi"
    )
    build(
        infra,
        builder_with(infra),
        make_spec(SCORE, extra_dockerfile_steps=steps),
        "limit-fallocate",
        "1",
        log_lines.append,
    )

    assert "keep-size-refused" in log_lines and "keep-size-allowed" not in log_lines
    assert any("fallocate" in line and "Operation not permitted" in line for line in log_lines)
