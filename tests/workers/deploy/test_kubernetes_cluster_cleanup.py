"""A deleted account's kubernetes services leave nothing on its clusters: the account's delete
keeps a sealed copy of each service's kubeconfig (app.deployments.cluster_cleanup), and the
deploy worker's sweep (workers.deploy.reconcile.clean_up_deleted_accounts) deletes the
service's objects from the fake API server (tests/workers/deploy/fake_kube_api.py), retries a
cluster that fails with the error kept free of credentials, and gives up after the last try."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.context import ServiceContext
from app.deployments.cluster_cleanup import FIRST_TRY_SECONDS, MAX_ATTEMPTS
from app.orm import ClusterCleanup, Installation
from app.orm.base import utcnow
from tests.workers.deploy import test_kubernetes_reconcile as kube
from tests.workers.deploy.fake_kube_api import FakeKubeApi
from tests.workers.deploy.test_kubernetes_reconcile import TOKEN, Service, _healthy
from workers.deploy import reconcile
from workers.deploy.reconcile import clean_up_deleted_accounts

# The kubernetes reconcile tests' fixtures (a fake cluster, a service deployed to it), found here by name.
account, context, fake, images, owner = kube.account, kube.context, kube.fake, kube.images, kube.owner
service = kube.service


def _held(cluster: FakeKubeApi) -> list[str]:
    """The kinds of every object the fake cluster holds, pods too."""
    return sorted(obj["kind"] for obj in cluster.objects.values())


def _delete_account(client: TestClient, deployed: Service) -> None:
    response = client.delete(f"{deployed.account}?force=true", headers=deployed.owner)
    assert response.status_code == 204, response.text


def _first_try_due(db: Session) -> None:
    """As FIRST_TRY_SECONDS later: the rows' first try, held back past any pass still at work on
    the services, is due."""
    assert all(r.next_attempt_at >= utcnow() + timedelta(seconds=FIRST_TRY_SECONDS - 60) for r in _rows(db))
    db.execute(update(ClusterCleanup).values(next_attempt_at=utcnow()))
    db.flush()


def _rows(db: Session) -> list[ClusterCleanup]:
    return list(db.scalars(select(ClusterCleanup).execution_options(populate_existing=True)))


def test_a_deleted_accounts_service_is_removed_from_its_cluster(
    client: TestClient, db: Session, context: ServiceContext, service: Service, fake: FakeKubeApi
) -> None:
    _healthy(service, fake)
    assert {"Deployment", "NetworkPolicy", "Pod", "Service"} <= set(_held(fake))
    _delete_account(client, service)
    [row] = _rows(db)
    assert (str(row.service_id), row.namespace, row.attempts) == (service.id, "tenant-a", 0)
    assert TOKEN not in row.sealed_credentials and "kubeconfig" not in row.sealed_credentials  # sealed

    assert clean_up_deleted_accounts(context) == []  # not yet: a pass may still be at work on it
    assert _rows(db)[0].attempts == 0 and "Pod" in _held(fake)
    _first_try_due(db)
    assert [str(s) for s in clean_up_deleted_accounts(context)] == [service.id]
    assert _held(fake) == []
    assert _rows(db) == []


def test_a_failing_cluster_is_retried_later_with_a_redacted_error_then_given_up(
    client: TestClient,
    db: Session,
    context: ServiceContext,
    service: Service,
    fake: FakeKubeApi,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _healthy(service, fake)
    _delete_account(client, service)
    _first_try_due(db)
    # The tenant rotated the cluster's token, and the server echoes what it was sent.
    fake.token, fake.echo_credentials = "a-new-token", True
    caplog.set_level(logging.INFO, logger="mms.deploy")
    before = utcnow()
    assert clean_up_deleted_accounts(context) == []
    [row] = _rows(db)
    assert row.attempts == 1 and row.next_attempt_at >= before + timedelta(seconds=55)
    assert "401" in (row.last_error or "") and TOKEN not in (row.last_error or "")
    assert "Pod" in _held(fake)
    clean_up_deleted_accounts(context)  # not due yet: not tried again
    assert _rows(db)[0].attempts == 1

    fake.stop()  # the cluster is gone for good
    db.execute(update(ClusterCleanup).values(attempts=MAX_ATTEMPTS - 1, next_attempt_at=utcnow()))
    db.flush()
    assert clean_up_deleted_accounts(context) == []
    assert _rows(db) == []
    [abandoned] = [r for r in caplog.records if r.msg == "deploy.cluster_cleanup_abandoned"]
    assert abandoned.service == service.id and abandoned.cluster == f"127.0.0.1:{fake.port}"  # type: ignore[attr-defined]
    assert TOKEN not in caplog.text and all(TOKEN not in str(r.__dict__) for r in caplog.records)


def test_a_copied_database_removes_nothing(
    client: TestClient,
    db: Session,
    context: ServiceContext,
    service: Service,
    fake: FakeKubeApi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _healthy(service, fake)
    _delete_account(client, service)
    _first_try_due(db)
    held = _held(fake)
    # As if this database were a copy made elsewhere: its identity is not the one recorded.
    db.execute(update(Installation).values(database_identity="postgresql:another:cluster"))
    db.flush()
    monkeypatch.setattr(reconcile, "_INSTALLATIONS", {})
    assert clean_up_deleted_accounts(context) == []
    assert _held(fake) == held
    [row] = _rows(db)
    assert row.attempts == 0 and row.last_error is None


def test_the_first_try_waits_out_the_longest_pass() -> None:
    """A pass that read the service before its force delete may still act on the target after
    it (then finds the row gone): the first try comes after any such pass has ended, so what it
    made goes with the rest."""
    from workers.deploy import kubernetes_driver, swarm

    # A swarm pass may use its PASS_SECONDS before it starts a generation, whose pull then has PULL_SECONDS.
    longest = max(swarm.PASS_SECONDS + swarm.PULL_SECONDS, kubernetes_driver._PASS_SECONDS)
    assert FIRST_TRY_SECONDS > longest + 60
