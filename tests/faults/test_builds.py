"""Builds under faults, with a real `mms serve`, a real `mms worker` (oci builder), the suite's
own PostgreSQL, Redis and registry.

- Redis restarted (killed, started empty: `--save ''`) with builds queued and one running:
  the queued messages are gone, so is the running build's unacknowledged one.
- PostgreSQL restarted while a build fetches the model: the worker's heartbeat and writes meet
  a dropped connection.

The database is the truth: every build must still end Succeeded within a bounded time, each
under its own version, none left NotStarted or Running, and the events must tell exactly
what happened.
"""

from __future__ import annotations

from tests.faults.build_service import TERMINAL, Account, Service, states_told
from tests.faults.conftest import BUILD_QUEUE, PostgresCluster, RedisServer

DEADLINE = 150


def test_builds_queued_when_redis_restarts_all_finish_once_and_the_events_say_so(
    service: Service,
    redis_server: RedisServer,
) -> None:
    account = Account(service, "redis-restart")
    manifest = account.manifest([])
    events = account.events()
    service.start("worker", "--concurrency", "1")
    try:
        ids = [account.build(manifest) for _ in range(3)]
        account.wait_for_state(ids, lambda images: any(i["CreationState"] == "Running" for i in images), 120)
        waiting = redis_server.queue_length(BUILD_QUEUE)
        redis_server.restart()  # the queue and the running build's unacknowledged message are gone
        assert waiting >= 1, "the other builds' messages should have been waiting in Redis"
        assert redis_server.queue_length(BUILD_QUEUE) == 0

        finished = account.wait_for_state(
            ids, lambda images: {i["CreationState"] for i in images} <= TERMINAL, DEADLINE
        )
        assert [i["CreationState"] for i in finished] == ["Succeeded"] * 3, [i.get("Error") for i in finished]
        assert sorted(i["Version"] for i in finished) == [1, 2, 3]
        for image in finished:  # each tag pullable, as recorded
            assert service.pulled_digest(image) == image["Digest"]
        # A re-sent message whose build was already claimed or done changes nothing.
        assert states_told(events, ids) == {i: ["NotStarted", "Running", "Succeeded"] for i in ids}
    finally:
        events.close()
        service.stop_workers()


def test_a_postgres_restart_mid_build_leaves_it_to_finish_and_the_events_tell_it(
    service: Service,
    postgres_cluster: PostgresCluster,
) -> None:
    account = Account(service, "pg-mid-build")
    manifest = account.manifest([account.held_model()])
    events = account.events()
    service.start("worker", "--concurrency", "1")
    try:
        service.files.asked.clear()
        service.files.held.clear()
        image_id = account.build(manifest)
        assert service.files.asked.wait(120), f"the build never fetched its model:\n{service.logs()}"
        postgres_cluster.restart()
        service.files.held.set()

        [image] = account.wait_for_state([image_id], lambda i: i[0]["CreationState"] in TERMINAL, DEADLINE)
        log = account.log(image_id)
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "request.unhandled_error" not in service.logs()
        told = states_told(events, [image_id])[image_id]
        # Whether the restart outlasted the lease or not, the story ends as the image does,
        # and every Running follows a NotStarted.
        assert told[0] == "NotStarted" and told[-1] == "Succeeded", told
        assert told in (
            ["NotStarted", "Running", "Succeeded"],
            ["NotStarted", "Running", "NotStarted", "Running", "Succeeded"],
        ), told
        assert ("build attempt 2" in log) == (len(told) == 5), log[-3000:]
    finally:
        events.close()
        service.files.held.set()
        service.stop_workers()
