"""The SparkPython runtime end to end: the seed's pySpark ``housing.model``, built and scored.

A PipelineModel trained here is zipped as a ``housing.model`` folder, registered with
``unpack: true`` and bundled by a ``spark-py`` manifest whose conda file names no pyspark;
the Spark base image is published daemonless by ``mms base-image publish --variant spark``;
each builder's image is run, timed from container start to its first successful ``/score``,
and must predict what the model predicts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.config import Settings
from app.database import make_engine, make_session_factory, session_scope
from app.services.base_images import default_base_image, list_base_images, record_base_image
from tests.embedded_service import free_port
from tests.factories import Callers, new_account
from tests.infra import Infra, run_script
from tests.workers.spark_housing import SPARK_SCORE_PY, HousingModel, train_housing_model
from tests.workers.stack import Account, Stack
from workers.build_context import SPARK_REQUIREMENT

SPARK_BUILD_TIMEOUT = 1800  # the docker builder downloads and builds pyspark (318 MB) itself
STARTUP_TIMEOUT = 300
# Not the shared org.mms.test: another test session's clean-up removes those at its end.
CONTAINER_LABEL = "org.mms.test.spark"


@pytest.fixture(scope="module")
def housing(tmp_path_factory: pytest.TempPathFactory) -> HousingModel:
    return train_housing_model(tmp_path_factory.mktemp("housing"))


@pytest.fixture(scope="module")
def spark_base(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`mms base-image publish --variant spark` into the open registry; (stderr, data dir)."""
    _, tar = run_script("spark-rootfs.sh")
    data_dir = tmp_path_factory.mktemp("spark-publish")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_REGISTRY": infra.registry})
    done = subprocess.run(
        [sys.executable, "-m", "workers", "base-image", "publish", "--variant", "spark", "--rootfs-tar", tar],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr, data_dir


def test_the_spark_base_is_published_beside_the_plain_one_labelled_with_its_java(
    infra: Infra, spark_base: tuple[str, Path]
) -> None:
    printed, data_dir = spark_base
    tag = f"py3.11-spark-{datetime.now(UTC):%Y%m%d}"
    reference = f"{infra.registry}/mms/inference-base:{tag}"
    assert f"published {reference}; it is now the default base image of SparkPython manifests" in printed
    tags = httpx.get(f"http://{infra.registry}/v2/mms/inference-base/tags/list", timeout=10).json()["tags"]
    assert {tag, "py3.11-spark"} <= set(tags)
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    manifest = httpx.get(
        f"http://{infra.registry}/v2/mms/inference-base/manifests/py3.11-spark", headers=accept, timeout=10
    ).json()
    config = httpx.get(
        f"http://{infra.registry}/v2/mms/inference-base/blobs/{manifest['config']['digest']}", timeout=10
    ).json()
    assert config["config"]["Labels"]["org.mms.java"].startswith("17.")
    # Recorded as the spark variant: listed, and the SparkPython default, not the CPU one.
    engine = make_engine(Settings(data_dir=data_dir, secret_key="x" * 40))
    with session_scope(make_session_factory(engine)) as session:
        listed = {e.variant: e for e in list_base_images(session)}
        assert listed["spark"].reference == reference and listed["spark"].available
        assert default_base_image(session, variant="spark") == reference
        assert default_base_image(session) is None
    engine.dispose()


def test_base_images_list_the_spark_variant(client: TestClient, callers: Callers, db: Session) -> None:
    owner = callers.headers()
    url = f"{new_account(client, owner)}/baseImages"
    unpublished = [b for b in client.get(url, headers=owner).json()["value"] if b["variant"] == "spark"]
    assert [b["available"] for b in unpublished] == [False]  # named, with how to make it
    record_base_image(
        db, reference="r.example/mms/inference-base:py3.11-spark-20300101", python_version="3.11", variant="spark"
    )
    spark = [b for b in client.get(url, headers=owner).json()["value"] if b["variant"] == "spark"]
    assert [(b["reference"], b["available"]) for b in spark] == [
        ("r.example/mms/inference-base:py3.11-spark-20300101", True)
    ]


def _spark_manifest(account: Account, model_id: str, *, base_image: str | None = None) -> str:
    """The seed's manifest body: runtime spark-py, a conda file whose pip section names numpy."""
    conda = f"name: housing\ndependencies:\n  - python=3.11\n  - pip:\n    - numpy=={numpy.__version__}\n"
    body = {
        "name": "housingmodel-manifest",
        "driverProgram": "score",
        "modelType": "Registered",
        "modelIds": [model_id],
        "assets": [
            {
                "id": "score",
                "url": account.upload("score.py", SPARK_SCORE_PY.encode()),
                "mimeType": "application/x-python",
                "unPack": False,
            }
        ],
        "targetRuntime": {
            "runtimeType": "spark-py",
            "properties": {"condaEnvFile": account.upload("myconda.yml", conda.encode())},
        },
    }
    if base_image:  # only the inference-configuration body names a base image
        body = {
            "name": "no-java",
            "modelIds": [model_id],
            "runtime": "spark-py",
            "assets": [{"id": "score.py", "url": body["assets"][0]["url"]}],
            "entryScript": "score.py",
            "baseImage": base_image,
        }
    return account.call("POST", f"{account.url}/manifests", json=body).json()["id"]


def _register(account: Account, housing: HousingModel) -> str:
    body = {
        "name": "housing.model",
        "tags": ["myTag"],
        "description": "my housing.model",
        "url": account.upload("housing.model.zip", housing.zipped()),
        "mimeType": "application/zip",
        "unpack": True,
    }
    return account.call("POST", f"{account.url}/models", json=body).json()["id"]


def time_first_score(api, image: str, rows: list) -> tuple[httpx.Response, float, str]:
    """Start ``image``; POST ``rows`` until /score answers; (answer, seconds since start, logs)."""
    port = free_port()
    container = api.create_container(
        image,
        environment={"PORT": str(port)},
        labels={CONTAINER_LABEL: "1"},
        host_config=api.create_host_config(network_mode="host"),
    )
    started = time.monotonic()
    api.start(container)
    try:
        while True:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/score", json={"data": rows}, timeout=60)
                return answer, time.monotonic() - started, api.logs(container).decode()
            except httpx.TransportError:
                state = api.inspect_container(container)["State"]
                assert state["Running"], api.logs(container).decode()[-3000:]
                assert time.monotonic() - started < STARTUP_TIMEOUT, api.logs(container).decode()[-3000:]
                time.sleep(0.1)
    finally:
        api.remove_container(container, force=True)


@pytest.mark.postgres_only
@pytest.mark.parametrize("builder", ["oci", "docker"])
def test_the_seed_pyspark_model_is_built_on_the_spark_base_and_scores_exactly(
    stack: Stack,
    infra: Infra,
    spark_base,
    housing: HousingModel,
    builder: str,
    record_property,
) -> None:
    account = Account(stack)
    manifest_id = _spark_manifest(account, _register(account, housing))
    manifest = account.call("GET", f"{account.url}/manifests/{manifest_id}").json()
    assert manifest["targetRuntime"]["runtimeType"] == "SparkPython"
    image = account.wait(
        account.build(manifest_id, "housingmodel-image", builder=builder)["Id"], seconds=SPARK_BUILD_TIMEOUT
    )
    log = account.log(image)
    assert image["CreationState"] == "Succeeded", log[-4000:]
    # Built on the published Spark base by default.
    assert f"{infra.registry}/mms/inference-base:py3.11-spark" in log
    assert "smoke test passed" in log

    with infra.api() as api:
        for _ in api.pull(image["ImageLocation"].rsplit(":", 1)[0], tag="1", stream=True, decode=True):
            pass
        infra.local_images.append(image["ImageLocation"])
        answer, seconds, logs = time_first_score(api, image["ImageLocation"], housing.rows)
    assert answer.status_code == 200, answer.text
    assert answer.json() == housing.predictions
    # The default pin: the conda file names no pyspark, the image runs SPARK_REQUIREMENT's.
    assert f"Spark {SPARK_REQUIREMENT.split('==')[1]} started in" in logs
    assert " INFO SparkContext" not in logs  # Spark's start-up chatter stays out
    record_property("seconds_to_first_score", round(seconds, 1))
    print(f"\n{builder} image: {seconds:.1f} s from container start to the first /score")


@pytest.mark.postgres_only
@pytest.mark.parametrize("builder", ["oci", "docker"])
def test_a_spark_manifest_on_a_base_without_java_fails_saying_so(
    stack: Stack,
    infra: Infra,
    housing: HousingModel,
    builder: str,
) -> None:
    account = Account(stack)
    manifest_id = _spark_manifest(account, _register(account, housing), base_image=infra.base_image)
    image = account.wait(account.build(manifest_id, "no-java", builder=builder)["Id"], seconds=300)
    assert image["CreationState"] == "Failed"
    message = image["Error"]["message"]
    assert "the base image has no Java runtime" in message and "--variant spark" in message
    log = account.log(image)  # refused before pyspark is fetched or built
    assert "Collecting pyspark" not in log and "pure-Python wheel" not in log
