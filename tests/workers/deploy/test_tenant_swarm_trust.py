"""What the deploy worker takes from a tenant's swarm and gives it, without an engine: the
engine's word is a port at most, never an address; the operator's registry login never goes there."""

from __future__ import annotations

import pytest

from app.config import Settings
from app.context import ServiceContext
from tests.workers.deploy.specs import swarm_spec
from workers.deploy.reconcile import _pull_auth
from workers.deploy.swarm import published_address

HOST = "203.0.113.7"  # the manager's address, as the worker checked it


def _status(*ports: object) -> dict:
    return {"State": "running", "PortStatus": {"Ports": list(ports)}}


def _port(published: object, *, target: object = 5001, mode: object = "host") -> dict:
    return {"Protocol": "tcp", "TargetPort": target, "PublishedPort": published, "PublishMode": mode}


def test_a_tasks_address_is_the_checked_manager_and_its_published_port() -> None:
    assert published_address(HOST, _status(_port(32768))) == f"{HOST}:32768"
    assert published_address(HOST, _status(_port(22, target=22), _port(30001))) == f"{HOST}:30001"


@pytest.mark.parametrize(
    "status",
    [
        _status(_port("127.0.0.1:5432")),  # an address where a port goes
        _status(_port("5432")),
        _status(_port(0)),
        _status(_port(70000)),
        _status(_port(-1)),
        _status(_port(True)),  # a bool is an int to Python, not a port
        _status(_port(5432.0)),
        _status(_port(32768, target=22)),  # another port of the task
        _status(_port(32768, mode="ingress")),
        _status("10.0.0.1:5001"),
        {"State": "running", "PortStatus": {"Ports": "10.0.0.1:5001"}},
        {"State": "running", "PortStatus": None},
        {"State": "running"},
    ],
)
def test_a_hostile_engines_port_status_gives_no_address(status: dict) -> None:
    assert published_address(HOST, status) is None


def test_the_operators_registry_login_never_goes_to_a_tenants_swarm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        registry="registry.example.com",
        registry_username="operator",
        registry_password="pushes-every-tenants-images",
        swarm_docker_host="unix:///var/run/docker.sock",
    )
    context = ServiceContext.build(settings)
    try:
        assert _pull_auth(context, swarm_spec("theirs")) is None
        operator = {"username": "operator", "password": "pushes-every-tenants-images"}
        assert _pull_auth(context, swarm_spec("swarm")) == operator  # the operator's own swarm
    finally:
        context.dispose()
