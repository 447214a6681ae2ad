"""The registry down for 30 s while a build pushes: killed (as a crash) the moment the build
starts its first blob upload to the image's repository, started again 30 s later.

The proxy in front of it stays up and answers 502 meanwhile, as a load balancer in front of
a registry does. The build must wait for the registry within its time budget, saying so in
its log, and end Succeeded in the same attempt: one version, one tag, the registry serving
the digest the service recorded, and the events NotStarted, Running, Succeeded.
"""

from __future__ import annotations

import time

from tests.faults.build_service import TERMINAL, Account, Service, scratch_left, states_told
from tests.faults.conftest import Registry

OUTAGE = 30
DEADLINE = 150


def test_a_registry_down_for_30_s_mid_push_is_waited_for_and_the_build_succeeds(
    service: Service,
    registry: Registry,
) -> None:
    name = "registry-down"
    account = Account(service, name)
    manifest = account.manifest([account.held_model()])
    events = account.events()
    service.start("worker", "--concurrency", "1")
    try:
        service.gate.hold("POST", rf"/v2/[0-9a-f-]{{36}}/{name}/blobs/uploads/")
        image_id = account.build(manifest, name=name)
        assert service.gate.reached.wait(60), f"the build never pushed:\n{service.logs()}"
        registry.stop()
        service.gate.release()  # the held upload meets a registry that is gone
        down = time.monotonic()
        while time.monotonic() - down < OUTAGE:
            state = account.image(image_id)["CreationState"]
            assert state == "Running", f"{state} while the registry was down:\n{account.log(image_id)[-3000:]}"
            time.sleep(1)
        registry.start()

        [image] = account.wait_for_state([image_id], lambda i: i[0]["CreationState"] in TERMINAL, DEADLINE)
        log = account.log(image_id)
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "registry" in log and "unreachable" in log and "retrying" in log, log[-3000:]
        assert "build attempt 2" not in log, log[-3000:]
        assert states_told(events, [image_id]) == {image_id: ["NotStarted", "Running", "Succeeded"]}
        assert [(i["Name"], i["Version"]) for i in account.images()] == [(name, 1)]
        assert service.tags(image) == ["1"]
        assert service.pulled_digest(image) == image["Digest"]
        assert scratch_left(service) == []
    finally:
        events.close()
        service.gate.release()
        if registry.process is None or registry.process.poll() is not None:
            registry.start()
        service.stop_workers()
