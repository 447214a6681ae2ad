"""The embedded default, as the README runs it: `mms serve` with no Redis, no registry, no engine.

SQLite, local assets, the embedded broker, a build worker started by `mms serve` itself, and
images in the service's own store, pulled back by the Docker engine (a real client) with a
service principal's id and secret. Restarting the service loses no queued build.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from contextlib import suppress
from dataclasses import replace

import docker
import pytest

from mms_client import InferenceConfig, Model, ServicePrincipalAuthentication, Workspace
from tests.embedded_service import EmbeddedService, alive, free_port, stop, wait_for, wait_for_children
from tests.infra import Infra
from tests.workers.stack import (
    ECHO_SCORE,
    SCORE_PY,
    Account,
    Stack,
    register_model,
    run_and_score,
    sklearn_requirements,
)


@pytest.fixture(scope="module")
def embedded(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> EmbeddedService:
    # The docker builder's RUN steps get the build network and its proxy, as on any service.
    networking = {"MMS_BUILD_NETWORK": infra.build_network}
    if infra.build_proxy:
        networking["MMS_BUILD_PROXY"] = infra.build_proxy
    return EmbeddedService.prepare(
        tmp_path_factory.mktemp("embedded-data"),
        tmp_path_factory.mktemp("embedded-logs"),
        infra.rootfs_tar,
        **networking,
    )


def _stack(embedded: EmbeddedService) -> Stack:
    return Stack(
        api=embedded.url,
        headers={"Authorization": f"Bearer {embedded.token()}"},
        env=embedded.env,
        workers=[],
        log_dir=embedded.log_dir,
    )


def test_the_run_command_alone_builds_serves_images_and_resumes_queued_builds(
    embedded: EmbeddedService, infra: Infra, model
) -> None:
    trained, rows, archive = model
    # Queued while no worker runs, then the service stops: the build must survive.
    server = embedded.serve("--no-build-worker")
    try:
        account = Account(_stack(embedded))
        manifest_id = account.manifest(register_model(account, archive), SCORE_PY, sklearn_requirements())
        created = account.build(manifest_id, "housing-image")
        time.sleep(2)
        assert account.call("GET", f"{account.url}/images/{created['Id']}").json()["CreationState"] == "NotStarted"
    finally:
        stop(server)

    server = embedded.serve()  # the README's run command: starts its own build worker
    try:
        # The worker is started once the API listens: a moment after /health first answers.
        [worker_pid] = wait_for_children(server.pid, 1)
        account.stack = _stack(embedded)
        image = account.wait(created["Id"])
        log = account.log(image)
        assert image["CreationState"] == "Succeeded", log[-3000:]
        assert "with the oci builder" in log and "smoke test skipped" not in log
        # The engine on the machine started it once, pulled from the service's own /v2/ with a
        # token for that image only: no principal, no login of the test's.
        assert image["SmokeTest"] == {"result": "Passed", "reason": None}, log[-3000:]
        assert "mms: smoke test: pulling" in log and "eyJ" not in log  # no token (JWT) in the log
        account_id = account.call("GET", account.url).json()["properties"]["accountId"]
        repository = f"127.0.0.1:{embedded.port}/{account_id}/housing-image"
        assert image["ImageLocation"] == f"{repository}:1"
        assert (embedded.data_dir / "images" / "index.json").is_file()

        # The Docker engine pulls it from the service with a service principal's login.
        login = {"username": embedded.client_id, "password": embedded.client_secret}
        with infra.api() as api:
            try:  # the engine refuses at once, or streams the refusal
                refusal = " ".join(
                    str(c.get("error", "")) for c in api.pull(repository, tag="1", stream=True, decode=True)
                )
            except docker.errors.APIError as exc:
                refusal = str(exc)
            assert re.search("(?i)unauthorized|denied|authentication required", refusal), refusal
            chunks = list(api.pull(repository, tag="1", stream=True, decode=True, auth_config=login))
            assert not [c for c in chunks if "error" in c], chunks[-3:]
            infra.local_images.append(image["ImageLocation"])
            scored = run_and_score(api, image["ImageLocation"], rows)
        assert scored.status_code == 200, scored.text
        assert scored.json() == trained.predict(rows).tolist()

        # An image of the service's own store as a base, read back through its /v2/ with the
        # Bearer token flow, by the builder's registry client.
        body = {
            "name": "on-own-image",
            "modelIds": [],
            "assets": [{"id": "score.py", "url": account.upload("score.py", ECHO_SCORE.encode())}],
            "entryScript": "score.py",
            "runtime": "python",
            "baseImage": image["ImageLocation"],
            "baseImageRegistry": {"address": f"127.0.0.1:{embedded.port}", **login},
        }
        derived_manifest = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
        derived = account.wait(account.build(derived_manifest, "derived")["Id"])
        derived_log = account.log(derived)
        assert derived["CreationState"] == "Succeeded", derived_log[-3000:]
        assert f"reading base image {repository}:1" in derived_log
        assert embedded.client_secret not in derived_log
    finally:
        stop(server)
    assert not alive(worker_pid), "the build worker outlived `mms serve`"


def test_the_docker_builder_builds_on_an_imported_base_into_the_services_own_store(
    embedded: EmbeddedService, infra: Infra, tmp_path
) -> None:
    # A base made with the engine and `docker save`d, imported as an operator would.
    archive = tmp_path / "engine-base.tar"
    with infra.api() as api, archive.open("wb") as out:
        for chunk in api.get_image(infra.base_image):
            out.write(chunk)
    imported = embedded.mms("base-image", "import", str(archive), "--name", "engine-base:1")
    assert imported.returncode == 0, imported.stderr[-3000:]
    base = f"127.0.0.1:{embedded.port}/mms/imported/engine-base:1"
    assert f"imported {base} sha256:" in imported.stderr

    marker = uuid.uuid4().hex
    server = embedded.serve()
    try:
        wait_for_children(server.pid, 1)
        account = Account(_stack(embedded))
        body = {
            "name": "docker-on-embedded",
            "modelIds": [],
            "assets": [{"id": "score.py", "url": account.upload("score.py", ECHO_SCORE.encode())}],
            "entryScript": "score.py",
            "runtime": "python",
            "baseImage": base,
            "extraDockerfileSteps": f"RUN echo {marker} > /opt/run-marker",
        }
        manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
        image = account.wait(account.build(manifest_id, "docker-built", builder="docker")["Id"])
        log = account.log(image)
        assert image["CreationState"] == "Succeeded", log[-4000:]
        assert "with the docker builder" in log
        assert f"mms: pulling base image {base}" in log and "eyJ" not in log  # a token, never shown
        assert "in the service's image store" in log
        # The smoke test pulled it back from the store and started it.
        assert image["SmokeTest"] == {"result": "Passed", "reason": None}, log[-3000:]
        account_id = account.call("GET", account.url).json()["properties"]["accountId"]
        repository = f"127.0.0.1:{embedded.port}/{account_id}/docker-built"
        assert image["ImageLocation"] == f"{repository}:1"

        # Pulled by a client with the principal's login, the RUN step's file is in it.
        login = {"username": embedded.client_id, "password": embedded.client_secret}
        with infra.api() as api:
            with suppress(docker.errors.ImageNotFound):  # the smoke test removes what it pulled
                api.remove_image(image["ImageLocation"], force=True)
            chunks = list(api.pull(repository, tag="1", stream=True, decode=True, auth_config=login))
            assert not [c for c in chunks if "error" in c], chunks[-3:]
            infra.local_images.append(image["ImageLocation"])
            container = api.create_container(image["ImageLocation"], entrypoint=["cat"], command=["/opt/run-marker"])
            try:
                api.start(container)
                assert api.wait(container, timeout=60)["StatusCode"] == 0
                assert api.logs(container).decode().strip() == marker
            finally:
                api.remove_container(container, force=True)
    finally:
        stop(server)


def _until_gone(account: Account, service_id: str) -> None:
    deadline = time.monotonic() + 60
    while account.status("GET", f"{account.url}/services/{service_id}") != 404:
        assert time.monotonic() < deadline, "the service was never deleted"
        time.sleep(0.5)


def test_the_run_command_deploys_web_services_pulled_from_its_own_store(
    embedded: EmbeddedService, infra: Infra, model, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.workers.deploy.test_local import _delete, _keys, _wait, _wait_scores

    trained, rows, archive = model
    scoring = f"http://127.0.0.1:{free_port()}"
    web = replace(embedded, env={**embedded.env, "MMS_WEB_SERVICES_PREVIEW": "true", "MMS_SCORING_URL": scoring})
    server = web.serve()  # with web services on: a build worker, a deploy worker and the gateway
    try:
        started = wait_for_children(server.pid, 3)
        wait_for(f"{scoring}/health", server)
        account = Account(_stack(web))
        model_id = register_model(account, archive)
        manifest_id = account.manifest(model_id, SCORE_PY, sklearn_requirements(), "web")
        image = account.wait(account.build(manifest_id, "web-housing")["Id"])
        assert image["CreationState"] == "Succeeded", account.log(image)[-3000:]
        created = account.call(
            "POST",
            f"{account.url}/services",
            json={"name": "embedded-housing", "imageId": image["Id"], "deploymentConfig": {"numReplicas": 1}},
        ).json()
        service = _wait(account, created["id"], "Healthy", "Failed")
        assert service["state"] == "Healthy", service
        assert service["scoringUri"].startswith(scoring)
        primary, _ = _keys(account, service["id"])
        assert _wait_scores(service, primary, rows).json() == pytest.approx(trained.predict(rows).tolist())
        _delete(account, service["id"])

        # The SDK's way, as the seeds write it: Model.deploy, wait_for_deployment, run.
        (tmp_path / "score.py").write_text(SCORE_PY)
        (tmp_path / "myenv.yml").write_text(
            f"name: housing\ndependencies:\n  - python=3.11\n  - pip:\n    - {sklearn_requirements().strip()}\n"
        )
        monkeypatch.chdir(tmp_path)
        *_, subscription, _, group, _, name = account.url.split("/")
        auth = ServicePrincipalAuthentication(web.client_id, web.client_secret)
        with Workspace(web.url, subscription, group, name, auth) as ws:
            config = InferenceConfig(entry_script="score.py", runtime="python", conda_file="myenv.yml")
            deployed = Model.deploy(ws, "sdk-housing", [model_id], config, {"computeType": "local"})
            assert deployed.state == "Transitioning"
            deployed.wait_for_deployment(timeout=600)
            assert deployed.state == "Healthy", deployed.error
            assert deployed.run(json.dumps({"data": rows})) == pytest.approx(trained.predict(rows).tolist())
            assert "Uvicorn running" in deployed.get_logs()  # copied in the pass that saw it answer
            deployed.delete()
            _until_gone(account, deployed.id)
    finally:
        stop(server)
    for pid in started:
        assert not alive(pid), "a child outlived `mms serve`"
