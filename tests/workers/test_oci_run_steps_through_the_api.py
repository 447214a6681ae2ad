"""RUN steps on the oci builder end to end: the HTTP API, a real build worker, buildah and the
engine, on the embedded default (`mms serve` with its own worker and image store, no
MMS_REGISTRY) and with MMS_REGISTRY (`mms serve` and `mms worker` on PostgreSQL and Redis).

A model is registered, a manifest's ``extraDockerfileSteps`` write a file straight under ``/``
and run a helper module of its ``sourceDirectory`` at build time; the image is built by the oci
builder, smoke-tested, pulled back, run and scored, and its answer carries what the steps
wrote. A step that fails fails the image, naming the step and with its last line. With MMS_REGISTRY
the stack also sets MMS_BUILD_PROXY, and a step pip-installs from PyPI through it.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from tests.embedded_service import EmbeddedService, stop, wait_for_children
from tests.infra import Infra
from tests.workers.stack import Account, Stack, embedded_account, register_model, run_and_score

BUILD_SECONDS = 420
SCORE = """\
import json, os
import helper  # beside this script, in the sourceDirectory

def init():
    global greeting, table, factor
    with open("/data/greeting") as f:  # written by a RUN step, straight under /
        greeting = f.read().strip()
    with open("/opt/steps/table.json") as f:  # written by the helper, run by a RUN step
        table = json.load(f)
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "factor.txt")) as f:
        factor = int(f.read())

def run(raw_data):
    rows = json.loads(raw_data)["data"]
    return {"greeting": greeting, "table": table, "scaled": [helper.scale(x, factor) for x in rows]}
"""
HELPER = """\
def scale(x, factor):
    return x * factor

def table():
    return {"squares": [i * i for i in range(4)]}
"""
STEPS = (
    "ENV GREETING=hello\n"
    'RUN mkdir /data && echo "$GREETING from a RUN step" > /data/greeting\n'
    "RUN mkdir -p /opt/steps && cd /var/azureml-app && "
    "python3 -c 'import helper, json; print(json.dumps(helper.table()))' > /opt/steps/table.json && "
    "echo table=$(cat /opt/steps/table.json)\n"
)
# With MMS_BUILD_PROXY (the stack sets it, as build-network.sh prints it): a step installs from
# PyPI through the egress proxy, from a network namespace of the build's own.
PIP_STEP = (
    "RUN python3 -m pip install --no-cache-dir --disable-pip-version-check --target /opt/pkgs six==1.16.0 && "
    "echo six=$(PYTHONPATH=/opt/pkgs python3 -c 'import six; print(six.__version__)')\n"
)
FAILING_STEPS = (
    "RUN echo the first step ran\n"
    "RUN echo step two starts && echo 'the last words of step two' && exit 3\n"
    "RUN echo never\n"
)
EXPECTED = {"greeting": "hello from a RUN step", "table": {"squares": [0, 1, 4, 9]}, "scaled": [3, 6]}


@pytest.fixture(scope="module")
def service(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """`mms serve` on the embedded default, with the bookworm base published."""
    embedded = EmbeddedService.prepare(
        tmp_path_factory.mktemp("run-steps-data"), tmp_path_factory.mktemp("run-steps-logs"), infra.rootfs_tar
    )
    server = embedded.serve()
    try:
        wait_for_children(server.pid, 1)  # its build worker
        yield embedded
    finally:
        stop(server)


def _zip(files: dict[str, str]) -> bytes:
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return data.getvalue()


def _manifest(account: Account, steps: str) -> str:
    """A registered model, a sourceDirectory with score.py and its helper, and ``steps``."""
    model_id = register_model(account, _zip({"factor.txt": "3"}))
    body = {
        "name": "run-steps",
        "modelIds": [model_id],
        "assets": [
            {
                "id": "src",
                "url": account.upload("src.zip", _zip({"score.py": SCORE, "helper.py": HELPER})),
                "mimeType": "application/zip",
                "unPack": True,
            }
        ],
        "sourceDirectory": "src",
        "entryScript": "score.py",
        "runtime": "python",
        "extraDockerfileSteps": steps,
    }
    return account.call("POST", f"{account.url}/manifests", json=body).json()["id"]


def _built(account: Account, steps: str, name: str) -> tuple[dict, str]:
    """The image built by the oci builder from a manifest with ``steps``, and its build log."""
    image = account.wait(account.build(_manifest(account, steps), name, builder="oci")["Id"], seconds=BUILD_SECONDS)
    log = account.log(image)
    assert image["Builder"] == "oci" and "with the oci builder" in log
    return image, log


def _check_the_steps_ran(image: dict, log: str) -> None:
    assert image["CreationState"] == "Succeeded", log[-4000:]
    # Each step is named in the build log (the ENV is step 1), with what it printed.
    assert "mms: extra step 2: RUN mkdir /data && echo " in log
    assert "mms: extra step 3: RUN mkdir -p /opt/steps && cd /var/azureml-app && " in log
    assert '\ntable={"squares": [0, 1, 4, 9]}\n' in log
    assert "contained by buildah" in log
    assert image["SmokeTest"] == {"result": "Passed", "reason": None}, log[-3000:]


def test_run_steps_on_the_embedded_default_are_in_the_image_that_scores(service: EmbeddedService, infra: Infra) -> None:
    account = embedded_account(service)
    image, log = _built(account, STEPS, "run-steps")
    _check_the_steps_ran(image, log)
    account_id = account.call("GET", account.url).json()["properties"]["accountId"]
    location = image["ImageLocation"]
    assert location == f"127.0.0.1:{service.port}/{account_id}/run-steps:1"  # the service's own store

    repository, _, tag = location.rpartition(":")
    login = {"username": service.client_id, "password": service.client_secret}
    with infra.api() as api:
        chunks = list(api.pull(repository, tag=tag, stream=True, decode=True, auth_config=login))
        assert not [c for c in chunks if "error" in c], chunks[-3:]
        infra.local_images.append(location)
        scored = run_and_score(api, location, [1, 2])
    assert scored.status_code == 200, scored.text
    assert scored.json() == EXPECTED


def test_a_failing_run_step_fails_the_image_naming_the_step_with_its_last_line(service: EmbeddedService) -> None:
    account = embedded_account(service)
    image, log = _built(account, FAILING_STEPS, "run-steps-fail")
    assert image["CreationState"] == "Failed", log[-3000:]
    message = image["Error"]["message"]
    assert "extra step 2 (RUN echo step two starts" in message and "exited with code 3" in message
    assert "the last words of step two" in message
    assert "\nthe first step ran\n" in log and "\nthe last words of step two\n" in log
    assert "mms: extra step 3" not in log  # the steps stop at the first that fails


@pytest.mark.postgres_only
def test_run_steps_with_mms_registry_are_in_the_pushed_image_that_scores(stack: Stack, infra: Infra) -> None:
    account = Account(stack)
    assert stack.env.get("MMS_BUILD_PROXY"), "the stack has no build proxy"
    image, log = _built(account, STEPS + PIP_STEP, "run-steps")
    _check_the_steps_ran(image, log)
    assert "\nsix=1.16.0\n" in log  # downloaded from PyPI through the proxy, and imported
    account_id = account.call("GET", account.url).json()["properties"]["accountId"]
    repository = f"{infra.registry}/{account_id}/run-steps"
    assert image["ImageLocation"] == f"{repository}:1"
    infra.pushed.append((infra.registry, f"{account_id}/run-steps", image["Digest"]))

    with infra.api() as api:
        chunks = list(api.pull(repository, tag="1", stream=True, decode=True))
        assert not [c for c in chunks if "error" in c], chunks[-3:]
        infra.local_images.append(image["ImageLocation"])
        scored = run_and_score(api, image["ImageLocation"], [1, 2])
    assert scored.status_code == 200, scored.text
    assert scored.json() == EXPECTED
    assert httpx.get(f"http://{infra.registry}/v2/{account_id}/run-steps/tags/list").json()["tags"] == ["1"]
