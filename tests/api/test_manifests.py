"""Manifests in both shapes: versions, validation against the account, secrets kept secret."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.dockerfile_smuggling import SMUGGLING
from tests.factories import model_body, new_account

SCORE_URL = "https://example.blob.core.windows.net/app/score.py?sv=2021-08-06&sp=r&se=2099-01-01T00:00:00Z&sig=abc"
CONDA_URL = "https://example.blob.core.windows.net/app/myconda.yml?sv=2021-08-06&sp=r&se=2099-01-01T00:00:00Z&sig=def"


@pytest.fixture()
def model_id(client: TestClient, owner: dict[str, str], account: str) -> str:
    return client.post(f"{account}/models", json=model_body(), headers=owner).json()["id"]


def seed_manifest(model_id: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "driverProgram": "scoringFileId",
        "description": "housing manifest",
        "modelType": "Registered",
        "name": "housingmodel-manifest",
        "modelIds": [model_id],
        "assets": [{"id": "scoringFileId", "url": SCORE_URL, "mimeType": "application/x-python", "unPack": "False"}],
        "targetRuntime": {"runtimeType": "SparkPython", "properties": {"condaEnvFile": CONDA_URL}},
    }
    body.update(overrides)
    return body


def inference_config(model_id: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "name": "custom-base",
        "modelIds": [model_id],
        "assets": [{"id": "score.py", "url": SCORE_URL}, {"id": "infenv.yml", "url": CONDA_URL}],
        "entryScript": "score.py",
        "runtime": "python",
        "condaFile": "infenv.yml",
        "extraDockerfileSteps": "RUN apt-get update && \\\n    apt-get install -y libgomp1\nENV A=1\nEXPOSE 8080",
        "enableGpu": False,
        "baseImage": "myregistry.azurecr.io/mycustomimage:1.0",
        "baseImageRegistry": {
            "address": "myregistry.azurecr.io",
            "username": "pull",
            "password": "hunter2-registry-secret",
        },
    }
    body.update(overrides)
    return body


def test_seed_manifest_round_trip_and_versions(
    client: TestClient, owner: dict[str, str], account: str, model_id: str
) -> None:
    first = client.post(f"{account}/manifests", json=seed_manifest(model_id), headers=owner)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["version"] == 1
    assert body["driverProgram"] == "scoringFileId"
    assert body["modelIds"] == [model_id]
    assert body["targetRuntime"] == {
        "runtimeType": "SparkPython",
        "properties": {"condaEnvFile": CONDA_URL, "pipRequirements": None},
    }
    assert body["assets"][0]["unPack"] is False
    unpacked = seed_manifest(model_id, name="unpacked")
    unpacked["assets"][0]["unPack"] = "TRUE"
    assert client.post(f"{account}/manifests", json=unpacked, headers=owner).json()["assets"][0]["unPack"] is True
    assert "CreatedTime" in body
    assert client.get(f"{account}/manifests/{body['id']}", headers=owner).json() == body

    second = client.post(
        f"{account}/manifests", json=seed_manifest(model_id, targetRuntime={"runtimeType": "spark-py"}), headers=owner
    )
    assert second.json()["version"] == 2
    assert second.json()["targetRuntime"]["runtimeType"] == "SparkPython"


def test_inference_config_shape_keeps_the_registry_password_secret(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = client.post(f"{account}/manifests", json=inference_config(model_id), headers=owner)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["driverProgram"] == "score.py"
    assert body["targetRuntime"]["runtimeType"] == "Python"
    assert body["targetRuntime"]["properties"]["condaEnvFile"] == CONDA_URL
    assert body["baseImage"] == "myregistry.azurecr.io/mycustomimage:1.0"
    assert body["baseImageRegistry"] == {"address": "myregistry.azurecr.io", "username": "pull"}
    fetched = client.get(f"{account}/manifests/{body['id']}", headers=owner)
    listed = client.get(f"{account}/manifests", headers=owner)
    for text in (created.text, fetched.text, listed.text, caplog.text):
        assert "hunter2-registry-secret" not in text

    string_registry = inference_config(
        model_id,
        baseImageRegistry="mcr.microsoft.com",
        baseImage="mcr.microsoft.com/azureml/o16n-sample-user-base/ubuntu-miniconda",
    )
    assert client.post(f"{account}/manifests", json=string_registry, headers=owner).status_code == 200


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"driverProgram": "nope"}, "driverProgram: 'nope' is not the id of one of the assets"),
        ({"modelIds": ["00000000-0000-0000-0000-000000000000"]}, "00000000-0000-0000-0000-000000000000"),
        ({"modelIds": ["not-a-uuid"]}, "not-a-uuid"),
        ({"description": "d" * 513}, "description"),
        ({"targetRuntime": {"runtimeType": "R"}}, "targetRuntime.runtimeType"),
        ({"name": "bad name"}, "name"),
        ({"assets": [{"id": "a", "url": SCORE_URL}, {"id": "a", "url": SCORE_URL}]}, "unique"),
        ({"assets": [{"id": "scoringFileId", "url": "ftp://x/score.py"}]}, "assets[0].url"),
        (
            {"assets": [{"id": "scoringFileId", "url": SCORE_URL, "unPack": "yes"}]},
            "assets[0].unPack: must be true or false",
        ),
    ],
)
def test_seed_shape_validation(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, change: dict[str, Any], fragment: str
) -> None:
    response = client.post(f"{account}/manifests", json=seed_manifest(model_id, **change), headers=owner)
    assert response.status_code == 400, response.text
    assert fragment in response.text
    assert client.get(f"{account}/manifests", headers=owner).json()["value"] == []


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"extraDockerfileSteps": "COPY / /host"}, "COPY is not allowed"),
        ({"extraDockerfileSteps": "RUN true\nFROM evil"}, "line 2: FROM is not allowed"),
        (
            {"extraDockerfileSteps": "RUN true\nuser 0:0"},
            "line 2: USER is not allowed: built images run as their own non-root user",
        ),
        ({"entryScript": "missing.py"}, "entryScript"),
        ({"condaFile": "missing.yml"}, "condaFile"),
        ({"baseImage": "Not A Reference!"}, "baseImage"),
        ({"baseImageRegistry": {"address": "bad address/x"}}, "baseImageRegistry.address"),
    ],
)
def test_inference_config_validation(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, change: dict[str, Any], fragment: str
) -> None:
    response = client.post(f"{account}/manifests", json=inference_config(model_id, **change), headers=owner)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"] or fragment in str(response.json()["details"])
    assert "hunter2-registry-secret" not in response.text


def test_an_extra_step_that_names_a_user_is_refused_naming_the_field(
    client: TestClient, owner: dict[str, str], account: str, model_id: str
) -> None:
    # Images run as their own non-root user: a tenant's USER root (or 0) never reaches a build.
    for steps in ("USER root", "RUN true\n  user 0"):
        body = inference_config(model_id, extraDockerfileSteps=steps)
        response = client.post(f"{account}/manifests", json=body, headers=owner)
        assert response.status_code == 400, response.text
        assert "extraDockerfileSteps" in response.text and "non-root" in response.json()["message"]
    assert client.get(f"{account}/manifests", headers=owner).json()["value"] == []


def test_models_of_another_account_are_refused(client: TestClient, owner: dict[str, str], account: str) -> None:
    other = new_account(client, owner)
    foreign = client.post(f"{other}/models", json=model_body(), headers=owner).json()["id"]
    response = client.post(f"{account}/manifests", json=seed_manifest(foreign), headers=owner)
    assert response.status_code == 400
    assert foreign in response.text


def test_list_filters_delete_and_model_in_use(
    client: TestClient, owner: dict[str, str], account: str, model_id: str
) -> None:
    other_model = client.post(f"{account}/models", json=model_body(name="other"), headers=owner).json()["id"]
    a1 = client.post(f"{account}/manifests", json=seed_manifest(model_id, name="m-a"), headers=owner).json()
    client.post(f"{account}/manifests", json=seed_manifest(model_id, name="m-a"), headers=owner)
    b1 = client.post(f"{account}/manifests", json=seed_manifest(other_model, name="m-b"), headers=owner).json()

    def names(query: str) -> list[tuple[str, int]]:
        return [
            (m["name"], m["version"]) for m in client.get(f"{account}/manifests?{query}", headers=owner).json()["value"]
        ]

    assert names("") == [("m-a", 2), ("m-a", 1), ("m-b", 1)]
    assert names(f"modelId={other_model}") == [("m-b", 1)]
    assert names("manifestName=m-a") == [("m-a", 2), ("m-a", 1)]
    assert names(f"modelId={uuid.uuid4()}") == []
    page = client.get(f"{account}/manifests?count=1", headers=owner).json()
    assert page["nextLink"] and len(page["value"]) == 1

    in_use = client.delete(f"{account}/models/{other_model}", headers=owner)
    assert in_use.status_code == 409
    assert in_use.json()["code"] == "ModelInUse"
    assert client.delete(f"{account}/manifests/{b1['id']}", headers=owner).status_code == 204
    assert client.delete(f"{account}/models/{other_model}", headers=owner).status_code == 204
    assert client.get(f"{account}/manifests/{b1['id']}", headers=owner).status_code == 404

    refused = client.delete(account, headers=owner)
    assert refused.status_code == 409 and "manifest" in refused.json()["message"]
    assert client.delete(f"{account}?force=true", headers=owner).status_code == 204
    assert client.get(f"{account}/manifests/{a1['id']}", headers=owner).status_code == 404


@pytest.mark.parametrize("name", SMUGGLING)
def test_extra_steps_that_smuggle_an_instruction_are_refused(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, name: str
) -> None:
    text, fragment = SMUGGLING[name]
    # json.dumps escapes every character, a lone surrogate too, as a client would send it.
    body = json.dumps(inference_config(model_id, extraDockerfileSteps=text))
    response = client.post(f"{account}/manifests", content=body, headers={**owner, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    if name == "lone surrogate":  # the JSON decoder refuses it first, naming the field
        fragment = "extraDockerfileSteps"
    assert fragment in str(response.json()["details"]) or fragment in response.json()["message"]
    assert client.get(f"{account}/manifests", headers=owner).json()["value"] == []


def _upload(client: TestClient, owner: dict[str, str], account: str, name: str, text: str) -> str:
    response = client.post(f"{account}/assets?name={name}", content=text.encode(), headers=owner)
    assert response.status_code == 201, response.text
    return response.json()["url"]


@pytest.mark.parametrize(
    ("requirements", "fragment"),
    [
        ("six\n--index-url https://evil.example/simple\n", "line 2 (--index-url): options are not accepted"),
        ("-e git+https://example.com/pkg.git\n", "line 1 (-e): options"),
        ("pkg @ https://example.com/pkg-1.0-py3-none-any.whl?sig=secret\n", "line 1 (pkg @ …): direct references"),
        (
            "git+https://example.com/pkg.git?sig=secret\n",
            "line 1 (git+https://example.com/pkg.git?…): not a requirement",
        ),
        # pip and uv honour options after a requirement: only --hash may follow one.
        (
            f"six==1.16.0 --hash=sha256:{'a' * 64} --extra-index-url http://evil.example/simple\n",
            "line 1 (six==1.16.0 --hash=sha256:",
        ),
        (
            "six==1.16.0 -f http://evil.example/links\n",
            "line 1 (six==1.16.0 -f http://evil.example/links): not a requirement",
        ),
    ],
)
def test_requirements_that_choose_their_package_source_are_refused_at_creation(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, requirements: str, fragment: str
) -> None:
    pip_url = _upload(client, owner, account, "requirements.txt", requirements)
    body = seed_manifest(model_id, targetRuntime={"runtimeType": "Python", "properties": {"pipRequirements": pip_url}})
    response = client.post(f"{account}/manifests", json=body, headers=owner)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"] and "pipRequirements" in response.json()["message"]
    assert "secret" not in response.text
    conda = "dependencies:\n  - python=3.11\n  - pip:\n" + "".join(
        f"    - {line}\n" for line in requirements.splitlines()
    )
    conda_body = inference_config(
        model_id,
        assets=[
            {"id": "score.py", "url": SCORE_URL},
            {"id": "env.yml", "url": _upload(client, owner, account, "env.yml", conda)},
        ],
        condaFile="env.yml",
    )
    response = client.post(f"{account}/manifests", json=conda_body, headers=owner)
    assert response.status_code == 400, response.text
    assert "condaFile: conda file pip:" in response.json()["message"]
    assert client.get(f"{account}/manifests", headers=owner).json()["value"] == []


def test_requirements_may_name_the_accounts_own_package_files(
    client: TestClient, owner: dict[str, str], account: str, model_id: str
) -> None:
    wheel_url = _upload(client, owner, account, "own-1.0-py3-none-any.whl", "not checked here")
    pip_url = _upload(client, owner, account, "requirements.txt", f"six==1.16.0\nown @ {wheel_url}\n")
    body = seed_manifest(model_id, targetRuntime={"runtimeType": "Python", "properties": {"pipRequirements": pip_url}})
    assert client.post(f"{account}/manifests", json=body, headers=owner).status_code == 200


def test_hashes_may_follow_a_requirement(
    client: TestClient, owner: dict[str, str], account: str, model_id: str
) -> None:
    pip_url = _upload(
        client, owner, account, "requirements.txt", f"six==1.16.0 --hash=sha256:{'a' * 64} --hash=sha256:{'b' * 64}\n"
    )
    body = seed_manifest(model_id, targetRuntime={"runtimeType": "Python", "properties": {"pipRequirements": pip_url}})
    assert client.post(f"{account}/manifests", json=body, headers=owner).status_code == 200


@pytest.mark.parametrize(
    ("conda", "fragment"),
    [
        (
            "channels:\n  - https://evil.example/channel\ndependencies:\n  - numpy\n",
            "channel 'https://evil.example/channel'",
        ),
        ("channels:\n  - attacker\ndependencies:\n  - numpy\n", "channel 'attacker' is not one of the operator's"),
        ("dependencies:\n  - attacker::numpy\n", "channel 'attacker'"),
    ],
)
def test_conda_channels_are_the_operators(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, conda: str, fragment: str
) -> None:
    body = inference_config(
        model_id,
        assets=[
            {"id": "score.py", "url": SCORE_URL},
            {"id": "env.yml", "url": _upload(client, owner, account, "env.yml", conda)},
        ],
        condaFile="env.yml",
    )
    response = client.post(f"{account}/manifests", json=body, headers=owner)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["message"]
    allowed = "channels:\n  - conda-forge\ndependencies:\n  - conda-forge::numpy\n"
    body["assets"][1]["url"] = _upload(client, owner, account, "env.yml", allowed)
    assert client.post(f"{account}/manifests", json=body, headers=owner).status_code == 200


def test_a_base_image_may_be_another_accounts_image_on_no_account(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, app_context
) -> None:
    registry = app_context.settings.image_registry
    own_id = client.get(account, headers=owner).json()["properties"]["accountId"]
    other_id = "00000000-0000-0000-0000-000000000001"
    host, _, port = registry.partition("/")[0].partition(":")
    for base in (
        f"{registry}/{other_id}/housing-image:1",
        f"{registry}/{other_id}/housing-image@sha256:{'a' * 64}",
        # The same registry spelled another way: a leading zero in its port.
        f"{host}:0{port}/{other_id}/housing-image:1",
    ):
        response = client.post(f"{account}/manifests", json=inference_config(model_id, baseImage=base), headers=owner)
        assert response.status_code == 400, response.text
        assert "neither a published base image (mms/) nor one of this account's images" in response.json()["message"]
    for base in (
        f"{registry}/{own_id}/housing-image:1",
        f"{registry}/mms/inference-base:py3.11",
        "myregistry.azurecr.io/other/image:v1",
    ):
        response = client.post(f"{account}/manifests", json=inference_config(model_id, baseImage=base), headers=owner)
        assert response.status_code == 200, response.text


# The seed's own manifest body, as its page shows it: a trailing comma after the asset.
SEED_TEXT = """{
   "driverProgram": "scoringFileId",
   "description": "<description content>",
   "modelType": "Registered",
   "name": "housingmodel-manifest",
   "modelIds": [
      "07b56951-3ce6-481a-bcb7-e76ee669e990"
   ],
   "assets": [
      {
         "id": "scoringFileId",
         "url": "<Sas Url of the scoring file>",
         "mimeType": "application/x-python",
         "unPack": "False"
      },
   ],
   "targetRuntime": {
      "runtimeType": "SparkPython",
      "properties": {
         "condaEnvFile": "<Sas Url of th condat file>"
      }
   }
}"""


def test_the_seeds_trailing_comma_is_pointed_at(client: TestClient, owner: dict[str, str], account: str) -> None:
    response = client.post(
        f"{account}/manifests", content=SEED_TEXT.encode(), headers={**owner, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    position = SEED_TEXT.index("},\n   ],") + len("},\n   ")  # the "]" after the comma
    line = SEED_TEXT.count("\n", 0, position) + 1
    message = response.json()["message"]
    assert f"not valid JSON at character {position} (line {line}, column 4)" in message, message
    assert "[" not in message.split("JSON")[0]  # no "[405]:" dressed as a field


GPU_BASE = "127.0.0.1:5000/mms/inference-base:py3.11-gpu-20300101"


def test_enable_gpu_needs_a_published_gpu_base_or_a_base_image(
    client: TestClient, owner: dict[str, str], account: str, model_id: str, db
) -> None:
    from app.services.base_images import record_base_image

    # A CPU base is published: it is no GPU base, and a gpu manifest must not build on it.
    record_base_image(db, reference="127.0.0.1:5000/mms/inference-base:py3.11-20300101", python_version="3.11")
    body = inference_config(model_id, enableGpu=True, baseImage=None, baseImageRegistry=None)
    refused = client.post(f"{account}/manifests", json=body, headers=owner)
    assert refused.status_code == 400, refused.text
    assert refused.json()["message"].startswith("Invalid request: enableGpu: no GPU base image is published")
    assert "mms base-image publish --variant gpu" in refused.json()["message"]
    assert refused.json()["details"][0]["code"] == "NoGpuBaseImage"
    assert client.get(f"{account}/manifests", headers=owner).json()["value"] == []
    # A custom base: the tenant vouches for its CUDA.
    custom = client.post(f"{account}/manifests", json=inference_config(model_id, enableGpu=True), headers=owner)
    assert custom.status_code == 200 and custom.json()["enableGpu"] is True
    # SparkPython has no GPU base either way.
    spark = inference_config(model_id, enableGpu=True, baseImage=None, baseImageRegistry=None, runtime="spark-py")
    record_base_image(db, reference=GPU_BASE, python_version="3.11", variant="gpu")
    response = client.post(f"{account}/manifests", json=spark, headers=owner)
    assert response.status_code == 400 and "enableGpu" in response.json()["message"]
    published = client.post(f"{account}/manifests", json=body, headers=owner)
    assert published.status_code == 200, published.text


SOURCE_DIRECTORY_URL = "https://example.blob.core.windows.net/app/src.zip?sv=2021-08-06&sp=r&se=2099-01-01&sig=ghi"


def source_directory_config(model_id: str, **overrides: Any) -> dict[str, Any]:
    assets = [
        {"id": "src", "url": SOURCE_DIRECTORY_URL, "mimeType": "application/zip", "unPack": True},
        {"id": "infenv.yml", "url": CONDA_URL},
    ]
    body = inference_config(
        model_id, assets=assets, sourceDirectory="src", entryScript="score/score.py", baseImageRegistry=None
    )
    body.update(overrides)
    return body


def test_a_source_directory_is_an_archive_asset_and_the_entry_script_a_path_in_it(
    client: TestClient, owner: dict[str, str], account: str, model_id: str
) -> None:
    created = client.post(f"{account}/manifests", json=source_directory_config(model_id), headers=owner)
    assert created.status_code == 200, created.text
    assert created.json()["sourceDirectory"] == "src" and created.json()["driverProgram"] == "score/score.py"


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"sourceDirectory": "./source"}, "sourceDirectory", "'./source' is not the id of one of the assets"),
        ({"sourceDirectory": "infenv.yml"}, "sourceDirectory", "must be an archive with unPack: true"),
        ({"entryScript": "/var/azureml-app/score.py"}, "entryScript", "not an absolute one"),
        ({"entryScript": "C:/src/score.py"}, "entryScript", "not an absolute one"),
        ({"entryScript": "score\\score.py"}, "entryScript", "not an absolute one"),
        ({"entryScript": "../score.py"}, "entryScript", "no '..'"),
        ({"entryScript": "score/../../etc/x.py"}, "entryScript", "no '..'"),
        ({"entryScript": "score//score.py"}, "entryScript", "plain path"),
        ({"entryScript": "score/score\n.py"}, "entryScript", "plain path"),
        ({"entryScript": "score/score.txt"}, "entryScript", "must be a .py file"),
        ({"entryScript": "s/" * 40 + "score.py"}, "entryScript", "at most 64 characters"),
    ],
)
def test_source_directory_and_entry_script_are_checked(
    client: TestClient,
    owner: dict[str, str],
    account: str,
    model_id: str,
    change: dict[str, Any],
    field: str,
    fragment: str,
) -> None:
    response = client.post(f"{account}/manifests", json=source_directory_config(model_id, **change), headers=owner)
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert message.startswith(f"Invalid request: {field}: ") and fragment in message, message
