"""A tenant against the local driver: its replica answers the readiness probe with hostile
HTTP, and its image's labels name another tenant's service.

The probe runs in the deploy worker, on the engine's host: a redirect it followed would make
the worker fetch whatever address the replica names (the host's loopback, another service's
replica) and read the redirect's body whole; a reply that drips would hold the pass, and with
it a deploy thread, past its lease. The replicas here are loopback servers (what the probe
sees is the same bytes). The labels: an image's labels are on every container that runs it,
a build's RUN steps (on the build network) and the smoke test included, so a label alone must
not make a container a replica of a service.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from app.deployments.reconciler import Failure, Spec, _failure_text
from app.deployments.states import ServiceState
from tests.infra import TEST_LABEL, Infra
from tests.listeners import endless_http_server, flaky_http_server, recording_http_server
from workers.containment import REPLICA_PORT, _image_home
from workers.deploy import local
from workers.deploy.local import (
    GENERATION_LABEL,
    IMAGE_LABEL,
    INSTALLATION_LABEL,
    SERVICE_LABEL,
    LocalDriver,
    answers,
)
from workers.deploy.local_network import ensure_service_network, network_name, remove_service_network


def test_the_probe_follows_no_redirect() -> None:
    with recording_http_server() as elsewhere:
        redirect = (302, [("Location", f"http://{elsewhere.address}/inside")])
        with flaky_http_server(b"{}", [redirect]) as replica:
            assert answers(replica.url.removeprefix("http://")) is False
        assert elsewhere.seen == []


def test_the_probe_reads_no_body() -> None:
    sent = []

    def redirect_with_an_endless_body(handler) -> bool:  # type: ignore[no-untyped-def]
        handler.send_response(302)
        handler.send_header("Location", "/")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        chunk = b"x" * (64 << 10)
        try:
            while sum(sent) < 64 << 20:  # a bound, so that a reader without one ends
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent.append(len(chunk))
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
        handler.close_connection = True
        return True

    with endless_http_server(answer_first=redirect_with_an_endless_body) as replica:
        started = time.monotonic()
        assert answers(replica.address) is False
        assert time.monotonic() - started < 2.5
    assert sum(sent) < 4 << 20, f"the probe read {sum(sent)} bytes"


def test_a_replica_that_drips_cannot_hold_the_probe() -> None:
    def drip(handler) -> bool:  # type: ignore[no-untyped-def]
        try:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 20:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(0.3)  # each byte well within a per-read timeout
        except OSError:
            pass
        handler.close_connection = True
        return True

    with endless_http_server(answer_first=drip) as replica:
        started = time.monotonic()
        assert answers(replica.address) is False
        assert time.monotonic() - started < 2.5


@pytest.fixture
def victim(infra: Infra) -> Iterator[tuple[LocalDriver, Spec, str]]:
    """Another tenant's service: its network exists (as after its first start), no replica yet."""
    service_id = uuid.uuid4()
    installation = f"test-{uuid.uuid4().hex[:8]}"
    pool = "10.213.0.0/16"
    driver = LocalDriver(infra.docker_host, installation=installation, subnet_pool=pool, tmp_mb=8, pids=64)
    with driver, infra.api() as api:
        ensure_service_network(api, service_id, pool, labels={TEST_LABEL: "hostile"})
        try:
            yield driver, _spec(service_id), installation
        finally:
            remove_service_network(api, service_id)


def _spec(service_id: uuid.UUID) -> Spec:
    now = datetime.now(UTC)
    return Spec(
        id=service_id,
        account_id=uuid.uuid4(),
        state=ServiceState.HEALTHY,
        compute_type="local",
        compute_name="local",
        compute_attached=False,
        image_id=uuid.uuid4(),
        image_location="127.0.0.1:5000/x/y",
        image_digest=None,
        generation=1,
        traffic_generation=1,
        replicas=1,
        cpu=0.5,
        memory_gb=0.5,
        scoring_timeout_ms=5000,
        revision=1,
        changed_at=now,
        switched_at=now,
    )


def test_a_container_labelled_with_another_service_is_not_its_replica(
    infra: Infra, victim: tuple[LocalDriver, Spec, str]
) -> None:
    """A tenant's image labelled org.mms.service=<the victim's id> (its scoring URI names the
    id), run as a build's RUN step on the build network with a server on the replica port:
    the victim's pass must not probe it, route to it, count it, remove it or fail over it,
    even with the installation's label (which labels every replica the tenant's image runs
    in: no secret)."""
    driver, spec, installation = victim
    labels = {
        INSTALLATION_LABEL: installation,
        TEST_LABEL: "hostile",
        SERVICE_LABEL: str(spec.id),
        GENERATION_LABEL: "1",
        IMAGE_LABEL: str(uuid.uuid4()),
    }
    with infra.api() as api:
        network = infra.build_network if infra.build_network != "none" else "bridge"
        container = api.create_container(
            infra.base_image,
            command=["python3", "-m", "http.server", str(REPLICA_PORT), "--bind", "0.0.0.0"],
            working_dir="/tmp",
            labels=labels,
            host_config=api.create_host_config(network_mode=network),
        )["Id"]
        try:
            api.start(container)
            time.sleep(1.5)  # serving by now
            replicas, failure = driver.observe(spec)
            assert [r for r in replicas if r.id == container] == [], replicas
            assert failure is None
        finally:
            api.remove_container(container, force=True, v=True)


def test_a_replica_that_prints_huge_lines_leaves_a_short_error() -> None:
    """The engine keeps a line of any length (in 16 KiB entries, the last 80 of which the
    driver reads): the service's error, in every GET of it and its events, stays short."""
    logs = "\n".join(["y" * (100 << 10)] * 60 + ["x" * (2 << 20)])
    error = _failure_text(Failure("a replica exited with code 1 3 times", logs))
    assert error.startswith("a replica exited with code 1 3 times\nlast lines of its output:\n")
    assert len(error) < 16 << 10, len(error)


# Takes every connection and never answers: the probe of each replica waits its whole timeout.
_SILENT = (
    "import socket\n"
    "server = socket.create_server(('0.0.0.0', 5001))\n"
    "held = []\n"
    "while True:\n"
    "    held.append(server.accept())\n"
)


def test_silent_replicas_cost_a_pass_one_probe_timeout_not_one_each(
    infra: Infra, victim: tuple[LocalDriver, Spec, str]
) -> None:
    """A deploy worker has a few threads for every tenant's passes: a tenant whose replicas all
    stall GET / must not hold one for a probe timeout per replica, every second."""
    driver, spec, installation = victim
    labels = {TEST_LABEL: "hostile", SERVICE_LABEL: str(spec.id), INSTALLATION_LABEL: installation}
    labels |= {GENERATION_LABEL: "1", IMAGE_LABEL: str(spec.image_id)}
    with infra.api() as api:
        started = []
        try:
            for _ in range(5):
                container = api.create_container(
                    infra.base_image,
                    command=["python3", "-c", _SILENT],
                    labels=labels,
                    host_config=api.create_host_config(network_mode=f"mms-svc-{spec.id.hex}"),
                )["Id"]
                started.append(container)
                api.start(container)
            time.sleep(1.5)  # listening by now
            began = time.monotonic()
            replicas, _ = driver.observe(spec)
            took = time.monotonic() - began
            assert sorted(r.id for r in replicas) == sorted(started)
            assert not any(r.ready for r in replicas)
            assert took < 2.5, f"observing 5 silent replicas took {took:.1f} s"
        finally:
            for container in started:
                api.remove_container(container, force=True, v=True)


@pytest.mark.parametrize("home", ["//etc", "//proc", "///sys/x", "//", "//etc/../dev"])
def test_a_home_the_engine_would_mount_over_its_own_folders_is_left_alone(home: str) -> None:
    """The engine cleans a mount's path (a tmpfs at //etc hides /etc), so a HOME is judged as
    it will be mounted."""
    assert _image_home([f"HOME={home}"], "", 0) is None


def test_a_home_with_doubled_slashes_is_mounted_where_the_engine_puts_it() -> None:
    assert _image_home(["HOME=//home/scoring"], "", 0) == "/home/scoring"


def test_the_sweep_removes_only_this_installations_orphans_and_reads_the_services_after_the_engine(
    infra: Infra, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An orphan (a service that no longer exists) loses its replica, then, one sweep later, its
    network (no gateway may still route to an address a new network would take); a known
    service and another installation's orphan keep theirs. The services that exist are read
    after the engine's listing: read first, a service made between the two reads had its network
    swept as it started."""
    pool = "10.213.0.0/16"
    installation = f"test-{uuid.uuid4().hex[:8]}"
    orphan, alive, foreign = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    order: list[str] = []
    listed = local.service_networks

    def listing(*args, **kwargs):  # type: ignore[no-untyped-def]
        order.append("engine")
        return listed(*args, **kwargs)

    def known() -> set[uuid.UUID]:
        order.append("database")
        return {alive}

    monkeypatch.setattr(local, "service_networks", listing)
    driver = LocalDriver(infra.docker_host, installation=installation, subnet_pool=pool, tmp_mb=8, pids=64)
    with driver, infra.api() as api:
        try:
            for service_id, owner in ((orphan, installation), (alive, installation), (foreign, "another")):
                ensure_service_network(api, service_id, pool, labels={TEST_LABEL: "sweep", INSTALLATION_LABEL: owner})
            replica = api.create_container(
                infra.base_image,
                command=["sleep", "60"],
                labels={SERVICE_LABEL: str(orphan), INSTALLATION_LABEL: installation, TEST_LABEL: "sweep"},
                host_config=api.create_host_config(network_mode=network_name(orphan)),
            )["Id"]
            api.start(replica)

            def networks() -> set[str]:
                return {n["Name"] for n in api.networks(filters={"label": f"{TEST_LABEL}=sweep"})}

            assert driver.sweep(known) == [orphan]
            assert order[-1] == "database" and "engine" in order
            assert not api.containers(all=True, filters={"id": replica}), "the orphan's replica is gone"
            assert networks() == {network_name(orphan), network_name(alive), network_name(foreign)}
            assert driver.sweep(known) == [orphan]  # the next sweep, a minute later in production
            assert networks() == {network_name(alive), network_name(foreign)}
        finally:
            for container in api.containers(all=True, filters={"label": f"{TEST_LABEL}=sweep"}):
                api.remove_container(container["Id"], force=True)
            for service_id in (orphan, alive, foreign):
                remove_service_network(api, service_id)
