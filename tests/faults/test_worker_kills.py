"""The worker kill -9'd (with its pool and beat) inside each step of a build, then another
worker started: the lease lapses, the reaper re-queues the build, and the second attempt
finishes it.

Each step is caught without a hook in the product: the model download is held by the test's
file server, and every other step by the registry proxy's gate holding the one request that
only that step makes:

    fetch        the model file's download
    pull-base    GET of the base image's manifest (mms/inference-base)
    environment  GET of the dependency cache's manifest (mms/cache/python-deps)
    install      the first POST .../blobs/uploads/ to the dependency cache: a new environment
                 (a pip entry no other build has) installed, its layer about to be cached
    layers       the first POST .../blobs/uploads/ to the image's repository (a new layer)
    push         PUT of the image's manifest, before the registry has it
    finish       PUT of the image's manifest once the registry stored it: pushed, not recorded

After each: Succeeded, exactly one version (1) and one tag, the registry serving the recorded
digest, the events NotStarted, Running, NotStarted, Running, Succeeded, and no build scratch
left in the workers' temporary folder.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.build_service import (
    TERMINAL,
    Account,
    Service,
    kill_group,
    scratch_left,
    states_told,
)

DEADLINE = 150
OWN_ENVIRONMENT = "dependencies:\n  - python=3.11\n  - pip:\n    - six==1.16.0\n"
IMAGE_REPOSITORY = r"/v2/[0-9a-f-]{{36}}/{name}"
CAUGHT_BY = {  # step → (method, path regex, held after the registry answered)
    "pull-base": ("GET", r"/v2/mms/inference-base/manifests/.+", False),
    "environment": ("GET", r"/v2/mms/cache/python-deps/manifests/.+", False),
    "install": ("POST", r"/v2/mms/cache/python-deps/blobs/uploads/", False),
    "layers": ("POST", IMAGE_REPOSITORY + "/blobs/uploads/", False),
    "push": ("PUT", IMAGE_REPOSITORY + "/manifests/.+", False),
    "finish": ("PUT", IMAGE_REPOSITORY + "/manifests/.+", True),
}


@pytest.mark.parametrize("step", ["fetch", *CAUGHT_BY])
def test_a_worker_killed_in_a_build_step_loses_its_lease_and_the_build_is_finished_once(
    service: Service,
    step: str,
) -> None:
    name = f"kill-{step}"
    account = Account(service, name)
    manifest = account.manifest([account.held_model()], conda=OWN_ENVIRONMENT if step == "install" else None)
    events = account.events()
    victim = service.start("worker", "--concurrency", "1")
    try:
        if step == "fetch":
            service.files.asked.clear()
            service.files.held.clear()
        else:
            method, path, answered = CAUGHT_BY[step]
            service.gate.hold(method, path.format(name=name), answered=answered)
        image_id = account.build(manifest, name=name)
        caught = service.files.asked if step == "fetch" else service.gate.reached
        assert caught.wait(60), f"the build never reached its {step} step:\n{service.logs()}"
        assert account.image(image_id)["CreationState"] == "Running"
        # Started first, it waits for the re-queued build: the victim holds the only message.
        service.start("worker", "--concurrency", "1")
        kill_group(victim)
        service.files.held.set()
        service.gate.release()  # a request the dead worker left in flight may still land
        killed = time.monotonic()

        [image] = account.wait_for_state([image_id], lambda i: i[0]["CreationState"] in TERMINAL, DEADLINE)
        log = account.log(image_id)
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "build attempt 2" in log, log[-3000:]
        assert time.monotonic() - killed < DEADLINE
        assert states_told(events, [image_id]) == {
            image_id: ["NotStarted", "Running", "NotStarted", "Running", "Succeeded"]
        }
        assert [(i["Name"], i["Version"]) for i in account.images()] == [(name, 1)]
        assert service.tags(image) == ["1"]
        assert service.pulled_digest(image) == image["Digest"]
        assert scratch_left(service) == [], "the killed build's scratch files are still there"
    finally:
        events.close()
        service.files.held.set()
        service.gate.release()
        service.stop_workers()
