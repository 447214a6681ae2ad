"""Image builds end to end: the HTTP API, a real Celery worker on Redis, the Docker engine and a registry.

A scikit-learn model trained here is zipped, uploaded, registered and built into an image
that is pulled back, run, and must predict exactly what the model predicts.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest

from tests.infra import Infra
from tests.listeners import recording_http_server
from tests.webhook_receiver import receiving
from tests.workers.stack import (
    ECHO_SCORE,
    SCORE_PY,
    Account,
    Stack,
    register_model,
    run_and_score,
    sklearn_requirements,
)

pytestmark = pytest.mark.postgres_only


@pytest.mark.parametrize("builder", ["oci", "docker"])
def test_a_trained_model_is_built_pulled_run_and_scores_exactly(
    stack: Stack, infra: Infra, model, builder: str
) -> None:
    trained, rows, archive = model
    account = Account(stack)
    model_id = register_model(account, archive)
    manifest_id = account.manifest(model_id, SCORE_PY, sklearn_requirements())
    created = account.build(manifest_id, "housing-image", builder=builder)

    image = account.wait(created["Id"])
    log = account.log(image)
    assert image["CreationState"] == "Succeeded", log[-3000:]
    assert image["Builder"] == builder and f"with the {builder} builder" in log
    # Repositories are per account: two accounts may both have an image "housing-image".
    account_id = account.call("GET", account.url).json()["properties"]["accountId"]
    repository = f"{infra.registry}/{account_id}/housing-image"
    assert image["ImageLocation"] == f"{repository}:1"
    assert image["Digest"].startswith("sha256:")
    assert image["Manifest"]["id"] == manifest_id
    assert "Succeeded" in log and "sig=" not in log
    assert "smoke test passed" in log

    with infra.api() as api:
        for _ in api.pull(repository, tag="1", stream=True, decode=True):
            pass
        scored = run_and_score(api, image["ImageLocation"], rows)
    assert scored.status_code == 200, scored.text
    assert scored.json() == trained.predict(rows).tolist()


def test_a_broken_init_fails_the_build_with_its_traceback(stack: Stack, model) -> None:
    _, _, archive = model
    account = Account(stack)
    model_id = register_model(account, archive)
    broken = "def init():\n    raise RuntimeError('the model file is corrupt')\n\ndef run(data):\n    return data\n"
    manifest_id = account.manifest(model_id, broken, "")
    image = account.wait(account.build(manifest_id, "broken-init")["Id"])
    log = account.log(image)
    assert image["CreationState"] == "Failed"
    assert "smoke test" in image["Error"]["message"]
    assert "RuntimeError: the model file is corrupt" in image["Error"]["message"]
    assert "Traceback" in log and "RuntimeError: the model file is corrupt" in log


def test_a_requirement_that_does_not_exist_fails_naming_it(stack: Stack, model) -> None:
    _, _, archive = model
    account = Account(stack)
    model_id = register_model(account, archive)
    manifest_id = account.manifest(model_id, SCORE_PY, "this-package-does-not-exist-mms==1.0\n")
    image = account.wait(account.build(manifest_id, "missing-req")["Id"])
    assert image["CreationState"] == "Failed"
    assert "this-package-does-not-exist-mms" in image["Error"]["message"]
    assert account.log(image).rstrip().splitlines()[-1].startswith("mms: Failed")


def test_a_worker_killed_mid_build_does_not_leave_the_image_running(stack: Stack, model) -> None:
    _, _, archive = model
    account = Account(stack)
    model_id = register_model(account, archive)
    manifest_id = account.manifest(model_id, SCORE_PY, sklearn_requirements() + "six==1.16.0\n", name="kill-manifest")
    created = account.build(manifest_id, "killed-build", builder="docker")  # the slower one
    account.wait_running(created["Id"])
    victim = stack.workers[-1]
    os.killpg(victim.pid, signal.SIGKILL)  # the worker and its pool process, mid-build
    victim.wait(timeout=30)
    stack.start_worker()
    image = account.wait(created["Id"])
    log = account.log(image)
    assert image["CreationState"] in ("Succeeded", "Failed"), log[-2000:]
    assert "build attempt 2" in log, log[-2000:]


def test_a_worker_asked_to_stop_hands_its_build_back_and_webhooks_tell_every_step(stack: Stack, model) -> None:
    _, _, archive = model
    account = Account(stack)
    with receiving(stack.hook_port) as receiver:
        account.call("POST", f"{account.url}/webhooks", json={"url": receiver.url})
        model_id = register_model(account, archive)
        manifest_id = account.manifest(
            model_id, SCORE_PY, sklearn_requirements() + "six==1.16.0\n", name="stop-manifest"
        )
        created = account.build(manifest_id, "stopped-build", builder="docker")  # the slower one
        account.wait_running(created["Id"])
        victim = stack.workers[-1]
        victim.terminate()  # SIGTERM to the worker's main process only, as `docker stop` sends it
        assert victim.wait(timeout=60) == 0  # a warm shutdown, within the 1 s grace and a log line
        queued = account.call("GET", f"{account.url}/images/{created['Id']}").json()
        assert queued["CreationState"] == "NotStarted", queued
        stack.start_worker()
        image = account.wait(created["Id"])
        log = account.log(image)
        assert image["CreationState"] == "Succeeded", log[-2000:]
        assert "did not finish within 1 s and goes back to the queue" in log
        assert "build attempt 2" in log
        deadline = time.monotonic() + 15
        while receiver.states(created["Id"])[-1:] != ["Succeeded"] and time.monotonic() < deadline:
            time.sleep(0.2)
    assert receiver.states(created["Id"]) == ["NotStarted", "Running", "NotStarted", "Running", "Succeeded"]


@pytest.fixture(scope="module")
def private_base(infra: Infra) -> str:
    """A copy of the base image in the password registry only."""
    image = f"{infra.auth_registry}/{infra.prefix}/e2e-base"
    with infra.api() as api:
        api.tag(infra.base_image, image, "py3.11")
        chunks = list(api.push(image, tag="py3.11", stream=True, decode=True, auth_config=infra.basic_auth()))
        assert not [c for c in chunks if "error" in c], chunks
        digest = next(c["aux"]["Digest"] for c in chunks if "aux" in c)
        api.remove_image(f"{image}:py3.11")
    infra.pushed.append((infra.auth_registry, f"{infra.prefix}/e2e-base", digest))
    return f"{image}:py3.11"


@pytest.mark.parametrize("builder", ["oci", "docker"])
def test_a_private_base_image_needs_its_credentials_which_never_show(
    stack: Stack, infra: Infra, private_base: str, builder: str
) -> None:
    account = Account(stack)
    score_url = account.upload("score.py", ECHO_SCORE.encode())

    def manifest(registry: dict | None) -> str:
        body = {
            "name": "private-base",
            "modelIds": [],
            "assets": [{"id": "score.py", "url": score_url}],
            "entryScript": "score.py",
            "runtime": "python",
            "baseImage": private_base,
        }
        if registry:
            body["baseImageRegistry"] = registry
        return account.call("POST", f"{account.url}/manifests", json=body).json()["id"]

    anonymous = account.wait(account.build(manifest(None), "no-creds", builder)["Id"])
    assert anonymous["CreationState"] == "Failed"
    assert "authentication" in anonymous["Error"]["message"] and infra.auth_registry in anonymous["Error"]["message"]

    creds = {"address": infra.auth_registry, "username": infra.username, "password": infra.password}
    manifest_id = manifest(creds)
    image = account.wait(account.build(manifest_id, "with-creds", builder)["Id"])
    log = account.log(image)
    assert image["CreationState"] == "Succeeded", log[-2000:]
    seen = [
        log,
        account.log(anonymous),
        json.dumps(image),
        account.call("GET", f"{account.url}/manifests/{manifest_id}").text,
        account.call("GET", f"{account.url}/images").text,
    ]
    seen += [path.read_text(errors="replace") for path in stack.log_dir.glob("*.log")]
    assert not [text for text in seen if infra.password in text]


@pytest.mark.parametrize("builder", ["oci", "docker"])
def test_a_base_image_at_a_private_address_fails_the_build_and_is_never_contacted(stack: Stack, builder: str) -> None:
    with recording_http_server() as listener:
        base = f"{listener.address}/x/y:1"
        account = Account(stack)
        score_url = account.upload("score.py", ECHO_SCORE.encode())
        body = {
            "name": "loopback-base",
            "modelIds": [],
            "baseImage": base,
            "assets": [{"id": "score.py", "url": score_url}],
            "entryScript": "score.py",
            "runtime": "python",
        }
        manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
        created = account.build(manifest_id, "loopback-base", builder)
        image = account.wait(created["Id"], seconds=120)
    log = account.log(image)
    assert image["CreationState"] == "Failed", log[-2000:]
    message = image["Error"]["message"]
    assert "pull-base" in message and "private address" in message, message
    assert f"registry {listener.address}" in message
    assert "MMS_FETCH_ALLOW_HOSTS" in message
    assert listener.seen == []


def test_cancelling_a_running_build_stops_it(stack: Stack) -> None:
    account = Account(stack)
    score_url = account.upload("score.py", ECHO_SCORE.encode())
    body = {
        "name": "slow",
        "modelIds": [],
        "assets": [{"id": "score.py", "url": score_url}],
        "entryScript": "score.py",
        "runtime": "python",
        "extraDockerfileSteps": f"RUN echo {uuid.uuid4().hex} && for i in $(seq 120); do echo tick $i; sleep 1; done",
    }
    manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
    created = account.build(manifest_id, "cancel-me", builder="docker")
    deadline = time.monotonic() + 120
    while "tick 2" not in account.call("GET", created["ImageBuildLogUri"]).text:
        assert time.monotonic() < deadline, "the slow step never ran"
        time.sleep(0.5)
    cancelled_at = time.monotonic()
    assert account.call("POST", f"{account.url}/images/{created['Id']}/cancel").json()["CreationState"] == "Running"
    image = account.wait(created["Id"], seconds=60)
    assert image["CreationState"] == "Cancelled"
    assert time.monotonic() - cancelled_at < 30  # long before the step's two minutes
    assert "cancelled" in account.log(image)


def test_a_run_step_on_the_oci_builder_reaches_only_the_allowed_indexes_and_a_refusal_names_them(
    stack: Stack,
) -> None:
    # The stack sets MMS_BUILD_PROXY: the oci builder's steps reach the package indexes through
    # it, and a host not on MMS_BUILD_ALLOW_HOSTS is refused there, failing the step.
    assert stack.env.get("MMS_BUILD_PROXY")
    account = Account(stack)
    score_url = account.upload("score.py", ECHO_SCORE.encode())
    fetch = "import urllib.request; urllib.request.urlopen('http://example.org/', timeout=20)"
    body = {
        "name": "needs-run",
        "modelIds": [],
        "assets": [{"id": "score.py", "url": score_url}],
        "entryScript": "score.py",
        "runtime": "python",
        "extraDockerfileSteps": f'ENV A=1\nRUN python3 -c "{fetch}"',
    }
    manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
    image = account.wait(account.build(manifest_id, "needs-run", builder="oci")["Id"], seconds=120)
    assert image["CreationState"] == "Failed"
    message = image["Error"]["message"]
    assert "RUN python3 -c" in message and "403" in message  # the step's own last line: the proxy's refusal
    assert "reaches only the package indexes of MMS_BUILD_ALLOW_HOSTS" in message
    assert "while running runtime" not in message
