"""A request's trips between the event loop and the thread pool: each costs about as much CPU
as the work of an indexed read (issue 20), so a read makes one, for its endpoint's database
work, and an empty request or a plain answer none beyond it (app/api/routing.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, get_session
from app.api.routing import ApiRoute
from app.context import ServiceContext
from app.main import create_app
from app.orm import Account
from tests.factories import client_with, model_body
from tests.live_server import live_service


@pytest.fixture()
def hops(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The functions sent to the thread pool, by name, as they are sent."""
    sent: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(function, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(getattr(function, "__qualname__", None) or getattr(function.func, "__qualname__", "?"))
        return await run_sync(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    yield sent


def test_a_read_and_a_registration_go_to_the_thread_pool_once_and_health_only_for_its_body(
    app_context: ServiceContext, db: Session, owner: dict[str, str], account: str, hops: list[str]
) -> None:
    # As in production: roles and accounts cached for MMS_AUTH_CACHE_SECONDS (the tests' is 0).
    client = client_with(app_context, auth_cache_seconds=60)
    model = client.post(f"{account}/models", json=model_body(), headers=owner).json()
    url = f"{account}/models/{model['id']}"
    assert client.get(url, headers=owner).status_code == 200  # the caller and the account cached
    hops.clear()
    assert client.get(url, headers=owner).status_code == 200
    assert len(hops) == 1, hops  # its endpoint; its answer is checked on the loop
    hops.clear()
    assert client.get("/health").json() == {"status": "ok"}
    assert len(hops) == 1, hops  # a plain def: its body, and nothing after it
    hops.clear()
    assert client.post(f"{account}/models", json=model_body(), headers=owner).status_code == 200
    assert len(hops) == 1, hops  # its endpoint and its COMMIT in the same trip


def test_a_write_whose_answer_breaks_its_model_is_not_committed(app_context: ServiceContext, db: Session) -> None:
    """The COMMIT runs in the endpoint's trip (app.api.routing): the answer is checked there first,
    so a write that answers a 500 leaves nothing behind, as when the COMMIT came after the check.
    The same for a coroutine endpoint (an upload's), whose session ends in a trip after it."""
    app = FastAPI()
    app.state.context = app_context
    router = APIRouter(route_class=ApiRoute)

    class Answer(BaseModel):
        id: int

    @router.post("/accounts/{name}", response_model=Answer)
    def make(name: str, session: SessionDep) -> dict[str, str]:
        account = Account(
            subscription_id="sub", resource_group="rg", name=name, location="eastus2", sku_name="S1", sku_capacity=1
        )
        session.add(account)
        session.flush()
        return {"id": "not a number"} if name.startswith("broken") else {"id": 1}

    @router.post("/async-accounts/{name}", response_model=Answer)
    async def make_async(name: str, session: SessionDep) -> dict[str, str]:
        return await anyio.to_thread.run_sync(make, name, session)

    app.include_router(router)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/accounts/broken").status_code == 500
    assert client.post("/accounts/fine").status_code == 200
    assert client.post("/async-accounts/broken-async").status_code == 500
    assert client.post("/async-accounts/fine-async").status_code == 200
    names = set(db.scalars(select(Account.name).where(Account.subscription_id == "sub")))
    assert names == {"fine", "fine-async"}


@pytest.mark.postgres_only
def test_on_postgresql_a_read_of_one_thing_makes_no_trip_to_a_thread_and_a_page_one(
    service_context: ServiceContext, data_dir: Path, hops: list[str]
) -> None:
    """Reads of one thing run on the event loop there (app.reads.LoopReads): the caller's roles,
    the account, and the route's own (a model, an image and its operation, which dashboards
    poll, and every other resource's); a page of many goes to the thread pool, once. A model's
    registration, with a key or without, runs on the loop (app.writes.LoopWrites); other writes
    take one trip."""
    with live_service(service_context, data_dir) as live:
        account = live.account()
        image = live.image(account)
        model = httpx.post(f"{account}/models", json=model_body(), headers=live.headers).json()
        manifest = httpx.get(f"{account}/manifests", headers=live.headers).json()["value"][0]
        one_thing = [
            f"{account}/models/{model['id']}",
            f"{account}/images/{image['Id']}",
            f"{account}/operations/{image['OperationId']}",
            f"{account}/manifests/{manifest['id']}",
            account,
        ]
        pages = [
            f"{account}/models",
            f"{account}/images",
            f"{account}/manifests",
            f"{account}/services",
            f"{account}/computes",
            f"{account}/webhooks",
            f"{live.base}/api/subscriptions/sub-live/resourceGroups/rg-live/accounts",
            f"{live.base}/api/servicePrincipals",
        ]
        for urls, trips in ((one_thing, []), (pages, ["ThreadReads.run.<locals>.call"])):
            for url in urls:  # the tests' MMS_AUTH_CACHE_SECONDS is 0: roles and account read each time
                hops.clear()
                answer = httpx.get(url, headers=live.headers)
                assert answer.status_code == 200, answer.text
                assert [hop for hop in hops if hop != "EventHub._read"] == trips, url  # but the event poller's
        # A registration is one statement, run on the loop too (app.writes); with a key, in one
        # transaction with the key's claim and answer, on the loop as well.
        for keyed, trips in ((False, []), (True, [])):
            hops.clear()
            headers = {**live.headers, "Idempotency-Key": "hops"} if keyed else live.headers
            assert httpx.post(f"{account}/models", json=model_body(), headers=headers).status_code == 200
            assert [hop for hop in hops if hop != "EventHub._read"] == trips, hops
        hops.clear()
        deleted = httpx.delete(f"{account}/models/{model['id']}", headers=live.headers)
        assert deleted.status_code in (200, 204), deleted.text
        assert [hop for hop in hops if hop != "EventHub._read"] == ["_in_thread_pool.<locals>.run.<locals>.call"], hops


def _needs_session(dependant: Dependant) -> bool:
    return any(d.call is get_session or _needs_session(d) for d in dependant.dependencies)


def test_every_route_with_a_session_is_one_that_ends_it(app_context: ServiceContext) -> None:
    """The route ends the request's session (app.api.routing): a route of a router made without
    ``route_class=ApiRoute`` would leave its writes uncommitted, so none has a session."""
    included = [c for c in iter_route_contexts(create_app(context=app_context).routes)]
    routes = [(c.path, c.original_route) for c in included if isinstance(c.original_route, APIRoute)]
    with_session = [(path, r) for path, r in routes if _needs_session(r.dependant)]
    assert {path for path, _ in with_session} >= {
        "/v2/token",
        "/api/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}/manifests",
    }
    assert [path for path, r in with_session if not isinstance(r, ApiRoute)] == []

    app = FastAPI()
    app.state.context = app_context
    plain = APIRouter()  # not an ApiRoute router

    @plain.post("/things")
    def make(session: SessionDep) -> None:
        session.execute(text("SELECT 1"))

    app.include_router(plain)
    with pytest.raises(RuntimeError, match="does not end it"):
        TestClient(app).post("/things")
