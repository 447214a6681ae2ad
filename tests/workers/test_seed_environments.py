"""The environments the seed documents show, each built end to end and scored: the API of `mms
serve` on the embedded default with its own build worker (the oci builder), images in the
service's own store, the smoke test on the machine's engine, and every image pulled back with a
principal's login, run and scored.

- the seeds' housing flow with a conda file holding conda packages (a channel the test writes:
  no public one is reachable here) and scikit-learn in its ``pip:`` section;
- Debian bullseye (Python 3.9) and trixie (Python 3.13) bases from `mms base-image publish
  --release bullseye|trixie`;
- a miniconda-style base (a Python 3.11 under /opt/miniconda, first on the config's PATH), made
  here with the engine FROM the trixie base and brought in with `mms base-image import`;
- a ``sourceDirectory`` sent by the client, with a module beside the script and a package at
  its root;
- ``enableGpu``: refused while no GPU base is published, then built on the published gpu variant.

One service for the module: each test publishes or imports the base it needs while it runs, as
an operator would.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mms_client.api import ServiceClient
from mms_client.operations import Uploads, create_manifest, inference_config_body
from mms_client.profile import Credentials, MemoryStore, Profile
from tests.embedded_service import EmbeddedService, stop, wait_for_children
from tests.infra import Infra, run_script
from tests.leftover_processes import shared_infrastructure_env
from tests.workers.conda_channel import add_package, add_python
from tests.workers.stack import Account, embedded_account, register_model, run_and_score, sklearn_requirements
from tests.workers.test_source_directory import project

BUILD_SECONDS = 420


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conda channel on local disk (tests/workers/conda_channel.py), read by the worker as
    file://: a data package in three versions, a noarch python library, and a python."""
    root = tmp_path_factory.mktemp("conda") / "channel"
    for version in ("1.0.0", "1.2.3", "2.0.0"):
        add_package(root, "greeting", version, {"share/greeting/VERSION": version.encode()})
    add_python(root, "3.11.7", "/usr/bin/python3.11")  # the base's interpreter, as conda's own
    add_package(
        root,
        "tinylib",
        "0.3",
        {"site-packages/tinylib/__init__.py": b"OFFSET = 0.0\n"},
        subdir="noarch",
        noarch="python",
        depends=["python >=3.8"],
    )
    return root


@pytest.fixture(scope="module")
def service(infra: Infra, channel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """`mms serve` on a data folder with the bookworm base published, the channel allowed."""
    embedded = EmbeddedService.prepare(
        tmp_path_factory.mktemp("seed-envs-data"),
        tmp_path_factory.mktemp("seed-envs-logs"),
        infra.rootfs_tar,
        MMS_CONDA_CHANNELS=json.dumps([f"local=file://{channel}"]),
    )
    server = embedded.serve()
    try:
        wait_for_children(server.pid, 1)  # its build worker
        yield embedded
    finally:
        stop(server)


def _built(account: Account, manifest_id: str, name: str) -> dict:
    """The image built from ``manifest_id``: Succeeded, by the oci builder, smoke-tested."""
    image = account.wait(account.build(manifest_id, name)["Id"], seconds=BUILD_SECONDS)
    log = account.log(image)
    assert image["CreationState"] == "Succeeded", log[-4000:]
    assert "with the oci builder" in log
    assert image["SmokeTest"] == {"result": "Passed", "reason": None}, log[-3000:]
    return image


def _pull_and_score(service: EmbeddedService, infra: Infra, image: dict, rows: list) -> tuple[httpx.Response, dict]:
    """Pull the image from the service with the principal's login, run it, score ``rows``:
    (the answer, the image's engine inspection)."""
    location = image["ImageLocation"]
    repository, _, tag = location.rpartition(":")
    login = {"username": service.client_id, "password": service.client_secret}
    with infra.api() as api:
        chunks = list(api.pull(repository, tag=tag, stream=True, decode=True, auth_config=login))
        assert not [c for c in chunks if "error" in c], chunks[-3:]
        infra.local_images.append(location)
        inspected = api.inspect_image(location)
        return run_and_score(api, location, rows), inspected


def _body(account: Account, score: str, conda: str | None = None, **fields: object) -> dict:
    """An inference configuration's manifest (the custom-image document's names)."""
    body = {
        "name": "seed-env",
        "modelIds": [],
        "assets": [{"id": "score.py", "url": account.upload("score.py", score.encode())}],
        "entryScript": "score.py",
        "runtime": "python",
        **fields,
    }
    if conda is not None:
        body["assets"].append({"id": "infenv.yml", "url": account.upload("infenv.yml", conda.encode())})
        body["condaFile"] = "infenv.yml"
    return body


HOUSING_SCORE = """
import json, os, pickle, sys
import tinylib

def init():
    global model
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.pkl"), "rb") as f:
        model = pickle.load(f)

def run(raw_data):
    with open(os.path.join(os.environ["CONDA_PREFIX"], "share/greeting/VERSION")) as f:
        greeting = f.read()
    rows = json.loads(raw_data)["data"]
    predictions = [p + tinylib.OFFSET for p in model.predict(rows).tolist()]
    return {"predictions": predictions, "executable": sys.executable, "greeting": greeting, "uid": os.getuid()}
"""


def test_the_seeds_housing_flow_with_conda_packages_builds_and_predicts(
    service: EmbeddedService, infra: Infra, model
) -> None:
    trained, rows, archive = model
    account = embedded_account(service)
    model_id = register_model(account, archive)
    # The seed's myconda.yml shape: conda packages from a channel, and pip packages under pip:.
    conda_file = (
        "name: housing\nchannels:\n  - local\ndependencies:\n  - python=3.11\n  - greeting >=1.1,<2\n"
        f"  - tinylib\n  - pip:\n    - {sklearn_requirements().strip()}\n"
    )
    body = {
        "name": "housingmodel-manifest",
        "driverProgram": "scoringFileId",
        "modelType": "Registered",
        "modelIds": [model_id],
        "assets": [
            {
                "id": "scoringFileId",
                "url": account.upload("scoring.py", HOUSING_SCORE.encode()),
                "mimeType": "application/x-python",
                "unPack": "False",
            }
        ],
        "targetRuntime": {
            "runtimeType": "Python",
            "properties": {"condaEnvFile": account.upload("myconda.yml", conda_file.encode())},
        },
    }
    manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
    image = _built(account, manifest_id, "housingmodel-image")
    log = account.log(image)
    assert "the image runs the conda environment's Python 3.11.7" in log, log[-3000:]

    scored, inspected = _pull_and_score(service, infra, image, rows)
    assert scored.status_code == 200, scored.text
    answer = scored.json()
    assert answer["predictions"] == trained.predict(rows).tolist()
    assert answer["executable"] == "/opt/mms/conda/bin/python3.11" and answer["greeting"] == "1.2.3"
    assert answer["uid"] == 10002  # not root
    env = dict(e.split("=", 1) for e in inspected["Config"]["Env"])
    assert env["CONDA_PREFIX"] == "/opt/mms/conda" and env["PATH"].startswith("/opt/mms/conda/bin:")


INTERPRETER_SCORE = """
import json, os, sys
from markupsafe import _speedups   # a compiled wheel: chosen for the base's Python and platform

def init():
    pass

def run(raw_data):
    return {"executable": sys.executable, "prefix": sys.prefix, "python": list(sys.version_info[:2]),
            "escaped": str(_speedups._escape_inner("<a>")), "uid": os.getuid(),
            "rows": len(json.loads(raw_data)["data"])}
"""


def _infenv(python: str) -> str:
    """The custom-image document's infenv.yml: the base's Python, and pip packages."""
    return f"name: project_environment\ndependencies:\n  - python={python}\n  - pip:\n    - markupsafe==3.0.2\n"


@pytest.fixture(scope="module")
def bullseye_base(service: EmbeddedService) -> str:
    """`mms base-image publish --release bullseye` (Python 3.9) into the service's store."""
    published = service.mms("base-image", "publish", "--release", "bullseye", timeout=900)
    assert published.returncode == 0, published.stderr[-3000:]
    base = f"127.0.0.1:{service.port}/mms/inference-base:py3.9"
    assert re.search(rf"published {re.escape(base)}-\d{{8}} \(variant cpu-bullseye\)", published.stderr), (
        published.stderr[-2000:]
    )
    return base


@pytest.fixture(scope="module")
def trixie_base(service: EmbeddedService) -> tuple[str, str]:
    """`mms base-image publish --release trixie` (Python 3.13) into the service's store:
    (its reference, its manifest's digest)."""
    published = service.mms("base-image", "publish", "--release", "trixie", timeout=900)
    assert published.returncode == 0, published.stderr[-3000:]
    base = f"127.0.0.1:{service.port}/mms/inference-base:py3.13"
    assert re.search(rf"published {re.escape(base)}-\d{{8}} \(variant cpu-trixie\)", published.stderr), (
        published.stderr[-2000:]
    )
    digest = re.search(rf"pushed {re.escape(base)} (sha256:[0-9a-f]{{64}})", published.stderr)[1]
    return base, digest


def _blob(service: EmbeddedService, digest: str) -> dict:
    """A JSON blob (manifest, config) of the service's own store."""
    return json.loads((service.data_dir / "images" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text())


def test_a_trixie_base_runs_python_3_13_and_scores(
    service: EmbeddedService, infra: Infra, trixie_base: tuple[str, str]
) -> None:
    account = embedded_account(service)
    body = _body(account, INTERPRETER_SCORE, _infenv("3.13"), baseImage=trixie_base[0])
    manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
    image = _built(account, manifest_id, "on-trixie")
    assert "base image runs Python 3.13 on x86_64-manylinux_2_40 (/usr/bin/python3)" in account.log(image)

    scored, _ = _pull_and_score(service, infra, image, [[1], [2]])
    assert scored.status_code == 200, scored.text
    answer = scored.json()
    assert answer["python"] == [3, 13] and answer["escaped"] == "&lt;a&gt;" and answer["rows"] == 2
    assert answer["executable"] == "/usr/bin/python3" and answer["uid"] == 10002


def test_a_bullseye_base_runs_python_3_9_and_scores(service: EmbeddedService, infra: Infra, bullseye_base: str) -> None:
    account = embedded_account(service)
    body = _body(account, INTERPRETER_SCORE, _infenv("3.9"), baseImage=bullseye_base)
    manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
    image = _built(account, manifest_id, "on-bullseye")
    assert "base image runs Python 3.9 on x86_64-manylinux_2_31 (/usr/bin/python3)" in account.log(image)

    scored, _ = _pull_and_score(service, infra, image, [[1], [2], [3]])
    assert scored.status_code == 200, scored.text
    answer = scored.json()
    assert answer["python"] == [3, 9] and answer["escaped"] == "&lt;a&gt;" and answer["rows"] == 3
    assert answer["executable"] == "/usr/bin/python3" and answer["uid"] == 10002


def test_a_miniconda_style_base_made_with_the_engine_runs_its_own_python(
    service: EmbeddedService, infra: Infra, trixie_base: tuple[str, str], tmp_path: Path
) -> None:
    # A user's base made on the published trixie base (its labels say Python 3.13) with
    # conda's layout added: /opt/miniconda/bin/python3 -> python3.11 (bookworm's, with its
    # standard library under the prefix's lib/), first on PATH. The image must run that one,
    # with wheels for 3.11, not the system's 3.13. A principal may not pull the service's
    # published bases (mms/), so the engine gets the same base from the same root file system
    # with the published config's labels and ENV.
    _, tar = run_script("base-rootfs.sh", env={**shared_infrastructure_env(), "MMS_ROOTFS_SUITE": "trixie"})
    published = _blob(service, _blob(service, trixie_base[1])["config"]["digest"])["config"]
    assert published["Labels"]["org.mms.python"].startswith("3.13")
    changes = [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in published["Labels"].items()]
    changes += [f"ENV {e}" for e in published["Env"]]
    engine_base = f"mms-test-trixie:{uuid.uuid4().hex[:8]}"
    dockerfile = (
        f"FROM {infra.base_image} AS bookworm\n"
        f"FROM {engine_base}\n"
        "COPY --from=bookworm /usr/bin/python3.11 /opt/miniconda/bin/python3.11\n"
        "COPY --from=bookworm /usr/lib/python3.11 /opt/miniconda/lib/python3.11\n"
        "RUN ln -s python3.11 /opt/miniconda/bin/python3 && mkdir /opt/miniconda/conda-meta"
        " && /opt/miniconda/bin/python3 -c 'import ssl, sys; assert sys.prefix == \"/opt/miniconda\"'\n"
        "ENV PATH=/opt/miniconda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    tag = f"mms-test-miniconda:{uuid.uuid4().hex[:8]}"
    archive = tmp_path / "miniconda.tar"
    with infra.api() as api:
        repository, _, version = engine_base.rpartition(":")
        api.import_image(src=tar, repository=repository, tag=version, changes=changes)
        infra.local_images.append(engine_base)
        output = list(
            api.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, network_mode="none", decode=True)
        )
        assert not [c for c in output if "error" in c], output[-5:]
        infra.local_images.append(tag)
        with archive.open("wb") as out:
            for chunk in api.get_image(tag):
                out.write(chunk)
    imported = service.mms("base-image", "import", str(archive), "--name", "miniconda:1")
    assert imported.returncode == 0, imported.stderr[-3000:]
    base = f"127.0.0.1:{service.port}/mms/imported/miniconda:1"
    assert f"imported {base} sha256:" in imported.stderr

    account = embedded_account(service)
    body = _body(account, INTERPRETER_SCORE, _infenv("3.11"), baseImage=base)
    manifest_id = account.call("POST", f"{account.url}/manifests", json=body).json()["id"]
    image = _built(account, manifest_id, "on-miniconda")
    assert "base image runs Python 3.11 on x86_64-manylinux_2_40 (/opt/miniconda/bin/python3)" in account.log(image)

    scored, _ = _pull_and_score(service, infra, image, [[1]])
    assert scored.status_code == 200, scored.text
    answer = scored.json()
    assert answer["executable"] == "/opt/miniconda/bin/python3" and answer["prefix"] == "/opt/miniconda"
    assert answer["python"] == [3, 11] and answer["escaped"] == "&lt;a&gt;" and answer["uid"] == 10002


def test_a_source_directory_sent_by_the_client_is_the_app_root_of_the_scored_image(
    service: EmbeddedService, infra: Infra, tmp_path: Path
) -> None:
    # score/score.py imports weights (beside it) and utils.features (a package at the root).
    project(tmp_path)
    account = embedded_account(service)
    profile = Profile(
        server=service.url,
        subscription="e2e",
        resource_group="rg",
        account=account.url.rsplit("/", 1)[1],
        client_id=service.client_id,
    )
    config = {"entryScript": "score/score.py", "sourceDirectory": "src", "runtime": "python"}
    with (
        ServiceClient(MemoryStore(profile, Credentials(client_secret=service.client_secret)), environment=False) as c,
        Uploads(c) as uploads,
    ):
        manifest = create_manifest(c, inference_config_body(c, uploads, config, tmp_path, "with-source", [], []))
    assert manifest["sourceDirectory"] == "src" and manifest["driverProgram"] == "score/score.py"
    image = _built(account, manifest["id"], "with-source")

    scored, inspected = _pull_and_score(service, infra, image, [1, 2])
    assert scored.status_code == 200, scored.text
    assert scored.json() == [20, 30]  # (x + 1) * 10
    assert inspected["Config"]["WorkingDir"] == "/var/azureml-app"


GPU_SCORE = "import os\n\ndef init():\n    pass\n\ndef run(raw):\n    return {'uid': os.getuid()}\n"


def test_enable_gpu_is_refused_until_a_gpu_base_is_published_then_builds_on_it(
    service: EmbeddedService, infra: Infra
) -> None:
    # Without a GPU base: refused at manifest creation naming the field (tests/api/
    # test_manifests.py::test_enable_gpu_needs_a_published_gpu_base_or_a_base_image too).
    account = embedded_account(service)
    refused = httpx.post(
        f"{account.url}/manifests", json=_body(account, GPU_SCORE, enableGpu=True), headers=account.stack.headers
    )
    assert refused.status_code == 400 and "enableGpu" in refused.json()["message"], refused.text

    published = service.mms("base-image", "publish", "--variant", "gpu", timeout=900)
    assert published.returncode == 0, published.stderr[-3000:]
    reference, digest = re.search(
        r"pushed (\S+/mms/inference-base:py3\.11-gpu-\d{8}) (sha256:[0-9a-f]{64})", published.stderr
    ).groups()

    manifest = account.call("POST", f"{account.url}/manifests", json=_body(account, GPU_SCORE, enableGpu=True)).json()
    assert manifest["enableGpu"] is True and manifest["baseImage"] is None
    image = _built(account, manifest["id"], "gpu-image")
    assert f"reading base image {reference}" in account.log(image)

    scored, inspected = _pull_and_score(service, infra, image, [[1]])
    assert scored.status_code == 200, scored.text
    assert scored.json() == {"uid": 10002}
    labels = inspected["Config"]["Labels"]
    assert labels["org.mms.gpu"] == "true" and labels["org.mms.cuda"] == "11.8"  # the gpu base's own label
    # Its FROM is the gpu base: the base's layers, in order, are the image's first ones.
    base_layers = _blob(service, _blob(service, digest)["config"]["digest"])["rootfs"]["diff_ids"]
    assert inspected["RootFS"]["Layers"][: len(base_layers)] == base_layers
