"""`mms serve` stops promptly on SIGTERM even with event streams open: each stream ends
cleanly (its client sees the end of the body, and reconnects elsewhere with Last-Event-ID)
instead of holding uvicorn's graceful shutdown until it gives up and cancels them."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.embedded_service import EmbeddedService, free_port
from tests.factories import account_url
from tests.sse import Listener


@pytest.mark.parametrize("worker", ["--build-worker", "--no-build-worker"])
def test_sigterm_ends_open_streams_and_the_server_exits_promptly_with_0(worker: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    port, data_dir = free_port(), tmp_path / "data"
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text"})
    service = EmbeddedService(env, port, data_dir, tmp_path)
    owner = service.mms("admin", "bootstrap", "-o", "json")
    assert owner.returncode == 0, owner.stderr
    credentials = json.loads(owner.stdout)
    service.client_id, service.client_secret = credentials["clientId"], credentials["clientSecret"]
    server = service.serve(worker)
    listeners: list[Listener] = []
    try:
        headers = {"Authorization": f"Bearer {service.token()}"}
        account = service.url + account_url("sub1", "rg1", "acct1")
        assert (
            httpx.put(
                account, headers=headers, timeout=10, json={"location": "eastus2", "sku": {"name": "S1", "capacity": 1}}
            ).status_code
            == 201
        )
        listeners = [Listener(f"{account}/images/events", headers) for _ in range(3)]
        for listener in listeners:
            assert listener.status == 200
            ready = listener.next()
            assert ready is not None and ready.event == "ready"

        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        for listener in listeners:
            assert listener.next(timeout=10) is None  # the stream ended
            assert listener.broken is None  # cleanly: a finished body, not one cut off
        status = server.wait(timeout=30)
        took = time.monotonic() - started
    finally:
        for listener in listeners:
            listener.close()
        if server.poll() is None:
            server.kill()
            server.wait(10)
    log = "\n".join(p.read_text(errors="replace") for p in tmp_path.glob("serve-*.log"))
    assert status == 0, log[-3000:]
    assert took < 5, f"took {took:.1f} s\n{log[-3000:]}"
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
