"""The kubernetes driver against a hostile API server: a tenant attaches a kubeconfig naming any
server it likes, so the server's answers are an attacker's. A deploy worker has a few threads
for every tenant's passes: no answer may hold one without end or fill its memory, and what the
cluster reports may not become a URL that leads elsewhere."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.workers.deploy.fake_kube_api import FakeKubeApi, fake_kube_api
from tests.workers.deploy.test_kubernetes_driver import TOKEN, _driver, _policy, _spec
from workers.deploy import kubernetes_driver
from workers.deploy.kubernetes_driver import KubernetesDriver
from workers.deploy.local import LOG_LINES_PER_PASS, EngineUnreachable, TargetRefused

CHUNK = 64 * 1024


@pytest.fixture()
def fake(tmp_path: Path) -> Iterator[FakeKubeApi]:
    with fake_kube_api(tmp_path, TOKEN) as api:
        yield api


class Sent:
    """What a hostile answer managed to write before the driver hung up."""

    def __init__(self) -> None:
        self.bytes = 0
        self.done = threading.Event()


def _endless_body(status: str, sent: Sent, *, limit: int) -> Callable[[BaseHTTPRequestHandler], None]:
    """An answer of ``status`` whose body goes on until the client hangs up (or ``limit``)."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        try:
            head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            handler.wfile.write(head.encode())
            handler.wfile.write(b'{"kind":"Status","message":"')
            while sent.bytes < limit:
                handler.wfile.write(b"x" * CHUNK)
                sent.bytes += CHUNK
        except OSError:
            pass  # the driver hung up
        finally:
            sent.done.set()
            handler.close_connection = True

    return answer


def _drip(head: bytes, *, every: float, for_seconds: float) -> Callable[[BaseHTTPRequestHandler], None]:
    """``head``, then one byte every ``every`` seconds: never silent long enough for a read timeout."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        ends = time.monotonic() + for_seconds
        try:
            handler.wfile.write(head)
            while time.monotonic() < ends:
                handler.wfile.write(b" ")
                time.sleep(every)
        except OSError:
            pass
        handler.close_connection = True

    return answer


@pytest.mark.parametrize("status", ["500 Internal Server Error", "404 Not Found", "302 Found"])
def test_an_error_answer_is_read_only_as_far_as_its_message(fake: FakeKubeApi, status: str) -> None:
    """The client reads an error's whole body into memory (ApiException: http_resp.data); a
    hostile server's endless one would fill the worker's memory."""
    sent = Sent()
    limit = 96 * 1024 * 1024
    fake.hostile = _endless_body(status, sent, limit=limit)
    with _driver(fake) as driver, pytest.raises((EngineUnreachable, TargetRefused)):
        driver.observe(_spec())  # its first call is a read whose 404 means "none yet"
    assert sent.done.wait(10)
    assert sent.bytes < 16 * 1024 * 1024, f"the driver read {sent.bytes} bytes of an error answer"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",  # the body drips
        b"HTTP/1.1 200 OK\r\nX-Drip: ",  # the headers drip
    ],
    ids=["body", "headers"],
)
def test_an_answer_that_drips_is_cut_off_at_the_calls_deadline(
    fake: FakeKubeApi, monkeypatch: pytest.MonkeyPatch, head: bytes
) -> None:
    """Each read gets a byte well within the read timeout, so only a deadline on the whole call
    ends it: without one, a tenant's cluster holds a deploy thread (of every tenant's few) for
    as long as it likes."""
    monkeypatch.setattr(kubernetes_driver, "_CALL_SECONDS", 1.0, raising=False)
    fake.hostile = _drip(head, every=0.1, for_seconds=6.0)
    started = time.monotonic()
    with _driver(fake) as driver, pytest.raises(EngineUnreachable) as raised:
        driver.apply(_spec())
    assert time.monotonic() - started < 4.0
    assert str(raised.value) == (f"the kubernetes cluster at 127.0.0.1:{fake.port} did not finish answering within 1 s")


def test_a_pass_has_a_deadline_for_all_its_calls(fake: FakeKubeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls each within their own deadline still add up: the driver's calls share one budget."""
    monkeypatch.setattr(kubernetes_driver, "_CALL_SECONDS", 30.0, raising=False)
    monkeypatch.setattr(kubernetes_driver, "_PASS_SECONDS", 1.5, raising=False)
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
        fake.hostile = _drip(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n",
            every=0.1,
            for_seconds=6.0,
        )
        started = time.monotonic()
        with pytest.raises(EngineUnreachable) as raised:
            driver.observe(spec)
    assert time.monotonic() - started < 4.0
    assert "did not finish answering within" in str(raised.value)


@pytest.mark.parametrize(
    "cluster_ip",
    [
        "fe80::1%@evil.example?",  # a zone id: http://[fe80::1%@evil.example?]:5001 is http://evil.example to a browser
        "fe80::1%<img src=x onerror=alert(1)>",
        "ff02::1",  # multicast
        "::",
        "0.0.0.0",
    ],
)
def test_a_cluster_address_that_is_no_unicast_address_is_no_endpoint(fake: FakeKubeApi, cluster_ip: str) -> None:
    spec = _spec()
    with _driver(fake) as driver:
        driver.apply(spec)
    [service] = fake.stored("services")
    key = ("services", "tenant-a", service["metadata"]["name"])
    fake.objects[key]["spec"]["clusterIP"] = cluster_ip
    with _driver(fake) as driver:  # the next pass: it reads the Service the cluster holds now
        assert driver.endpoint(spec) is None
        fake.objects[key]["spec"]["clusterIP"] = "fd00:10:96::1a"
        assert driver.endpoint(spec) == "[fd00:10:96::1a]:5001"


def test_a_basic_login_echoed_by_the_cluster_is_cut_out_as_well(fake: FakeKubeApi) -> None:
    """The password is cut out of the cluster's messages, but it is sent as base64 of
    ``username:password``: a server that echoes the header it got would put that, as good as
    the password, in the service's error (which every Reader of the account sees)."""
    password = "hunter2  with two spaces"  # whitespace the message's tidying would change
    kubeconfig = fake.kubeconfig().replace(
        f"    token: {TOKEN}\n", f'    username: deployer\n    password: "{password}"\n'
    )
    fake.echo_credentials = True
    login = base64.b64encode(f"deployer:{password}".encode()).decode()
    with _driver(fake, kubeconfig=kubeconfig) as driver, pytest.raises(TargetRefused) as raised:
        driver.apply(_spec())
    assert fake.seen[0].authorization == f"Basic {login}"  # sent, and echoed
    message = str(raised.value)
    assert login not in message and "hunter2" not in message
    assert message.endswith("refused the kubeconfig's credentials (401): Unauthorized: Basic ***")


def test_a_log_longer_than_asked_for_adds_no_more_lines_than_a_pass_copies(fake: FakeKubeApi) -> None:
    """A pass asks each pod for its last LOG_LINES_PER_PASS lines; a cluster that sends every
    line it likes (here 200 000 short ones, 6.6 MB) must not become that many rows to write
    per pod, every pass."""
    spec = _spec()
    fake.honour_tail = False
    with _driver(fake) as driver:
        driver.apply(spec)
        names = fake.run_pods(2)
        flood = [f"2026-12-04T10:00:00.{i:09d}Z x" for i in range(1, 200_001)]
        fake.logs[names[0]] = flood
        fake.logs[names[1]] = ["2026-12-04T10:00:01Z ready"]
        replicas, _ = driver.observe(spec)
        lines = driver.read_logs(spec, replicas)
    flooded = [line for line in lines if line.replica_id == names[0]]
    assert len(flooded) == LOG_LINES_PER_PASS
    assert flooded[-1].logged_ns == lines_ns(flood[-1])  # the newest kept
    assert [line.text for line in lines if line.replica_id == names[1]] == ["ready"]
    asked = [s for s in fake.seen if s.path.endswith("/log")]
    assert asked and all(s.query.get("limitBytes") for s in asked)  # a cluster that honours it sends less


def lines_ns(line: str) -> int:
    stamp = line.partition(" ")[0]
    return int(datetime.fromisoformat(stamp[:19]).replace(tzinfo=UTC).timestamp()) * 10**9 + int(stamp[20:29])


def test_only_the_current_clusters_name_is_resolved_when_a_pass_connects(fake: FakeKubeApi) -> None:
    """A kubeconfig of 256 KiB holds thousands of clusters, each named under a zone whose server
    may take a resolver's whole timeout to answer: resolving every one each pass held a deploy
    thread for hours. Clusters the pass never connects to are judged by their form (and by
    their address when they are written as one), their names not resolved."""
    extra = "".join(f"- name: spare{i}\n  cluster:\n    server: https://c{i}.slow.example:6443\n" for i in range(200))
    kubeconfig = fake.kubeconfig().replace("users:", extra + "users:", 1)
    asked: list[str] = []

    def resolver(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        asked.append(host)
        time.sleep(0.01)  # a slow zone, in small
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    driver = KubernetesDriver(kubeconfig, namespace="tenant-a", policy=_policy(fake), resolver=resolver)
    with driver:
        driver.apply(_spec())
    assert asked == []  # the current server is an address: nothing to resolve at all
    # A spare written as a private address is still refused, as before.
    private = kubeconfig.replace("https://c7.slow.example:6443", "https://10.0.0.1:6443")
    with pytest.raises(TargetRefused) as raised:
        KubernetesDriver(private, namespace="tenant-a", policy=_policy(fake), resolver=resolver)
    assert "clusters[8].cluster.server" in str(raised.value) and "a private address" in str(raised.value)
