"""A tenant's node other than its manager is routed to only once proven (workers/deploy/
tenant_swarm.py ``prove_node``): the engine at the address the tenant claims for it must hold a
certificate for that address from the tenant's CA, refuse a client without a certificate, admit
the tenant's, and say it is that node. Against TLS engines on 127.0.0.1 (the hostile engine of
test_tenant_swarm_bounds.py); the two-node swarm's tests prove a real node and refuse one whose
certificate another CA signed (test_multinode_swarm.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.workers.deploy.test_tenant_swarm_bounds import _Engine, certs, serving_tls  # noqa: F401
from workers.deploy import tenant_swarm
from workers.deploy.tenant_swarm import prove_node
from workers.fetcher import FetchPolicy

LOOPBACK_ALLOWED = FetchPolicy(allow_hosts=["127.0.0.1"])


@contextlib.contextmanager
def _engine(
    certs: dict[str, str],  # noqa: F811
    *,
    client_certificate: bool,
    node_id: str = "n2",
    also_trusted: str | None = None,
) -> Iterator[tuple[int, list[str]]]:
    """A TLS engine on 127.0.0.1 whose /info says it is ``node_id``, requiring a client
    certificate from the CA (or ``also_trusted``'s, PEM) or not; its port and the paths it was
    asked for."""
    asked: list[str] = []

    def answer(path: str) -> tuple[int, dict[str, str], bytes] | None:
        asked.append(path)
        if path == "/info":
            return 200, {}, json.dumps({"Swarm": {"NodeID": node_id, "LocalNodeState": "active"}}).encode()
        return None

    handler = type("Engine", (_Engine,), {"hostile": staticmethod(answer)})
    with serving_tls(handler, certs, client_certificate=client_certificate, also_trusted=also_trusted) as port:
        yield port, asked


def _paths(certs: dict[str, str]) -> dict[str, Path]:  # noqa: F811
    return {name: Path(certs[name]) for name in ("ca", "cert", "key")}


def test_a_node_is_proven_by_an_engine_that_admits_only_the_tenants_certificate_and_is_that_node(
    certs: dict[str, str],  # noqa: F811
) -> None:
    with _engine(certs, client_certificate=True) as (port, asked):
        assert prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=LOOPBACK_ALLOWED, port=port)
        # Another node's ID claimed at that address: the engine there is not that node.
        assert not prove_node("n3", "127.0.0.1", paths=_paths(certs), policy=LOOPBACK_ALLOWED, port=port)
    assert "/info" in asked


def test_an_engine_open_to_any_client_proves_nothing(certs: dict[str, str]) -> None:  # noqa: F811
    # Anyone may ask such an engine its node ID (and run anything there): claiming it says
    # nothing of whose the node is.
    with _engine(certs, client_certificate=False) as (port, asked):
        assert not prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=LOOPBACK_ALLOWED, port=port)
    assert "/info" in asked  # it answered, without a certificate


def test_a_node_at_an_address_the_fetch_policy_refuses_is_never_connected_to(certs: dict[str, str]) -> None:  # noqa: F811
    with _engine(certs, client_certificate=True) as (port, asked):
        assert not prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=FetchPolicy(), port=port)
        # A port-scoped entry that is not the engine's port: no connection either.
        scoped = FetchPolicy(allow_hosts=[f"127.0.0.1:{port + 1}"])
        assert not prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=scoped, port=port)
    assert asked == []


def test_a_node_whose_engine_never_answers_is_not_proven_within_the_proofs_bound(
    certs: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tenant_swarm, "PROOF_SECONDS", 2.0)
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks TLS
        silent.settimeout(0.2)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    held.append(silent.accept()[0])

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            started = time.monotonic()
            port = silent.getsockname()[1]
            assert not prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=LOOPBACK_ALLOWED, port=port)
            assert time.monotonic() - started < 2.0 + 3.0  # its bound, and a little
            assert held  # it did connect
        finally:
            stop.set()
            thread.join(timeout=5)
            for connection in held:
                connection.close()


def test_an_engine_that_admits_a_certificate_nobody_signed_proves_nothing(certs: dict[str, str]) -> None:  # noqa: F811
    # As an engine that admits any client certificate (a proxy told to): the worker's own
    # certificate that nobody signed gets in, so the tenant's getting in says nothing.
    nobody = tenant_swarm._nobodys_key_and_certificate()[1].decode()
    with _engine(certs, client_certificate=True, also_trusted=nobody) as (port, asked):
        assert not prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=LOOPBACK_ALLOWED, port=port)
    assert asked.count("/info") == 1  # nobody's certificate was answered


def test_no_proof_is_begun_past_the_passs_deadline(certs: dict[str, str]) -> None:  # noqa: F811
    with _engine(certs, client_certificate=True) as (port, asked):
        started = time.monotonic()
        late = started - 1
        assert not prove_node("n2", "127.0.0.1", paths=_paths(certs), policy=LOOPBACK_ALLOWED, port=port, deadline=late)
        assert time.monotonic() - started < 1
    assert asked == []
