"""The Python SDK (`from mms_client import Workspace, ...`) driving the seeds' flows against a live
`mms serve` (embedded default, no build worker): a workspace signed in with a service principal
or from the CLI's login, models registered from a file and a folder, listed and fetched, an
inference configuration with a conda file, a source directory and a private base-image registry,
`Model.package` queueing a build, and `wait_for_creation` following a build this test finishes
itself through the server's own build transitions (app.builds) on the service's database."""

from __future__ import annotations

import io
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.builds.leases import claim_build, finish_build
from app.builds.states import CreationState
from mms_client import Image, InferenceConfig, Model, ServiceError, ServicePrincipalAuthentication, Workspace
from tests.cli.test_first_hour import client, owner, service  # noqa: F401  (the fixtures)
from tests.embedded_service import EmbeddedService
from tests.mms_client.test_client import Client
from workers.build_log import BuildLogWriter

CONDA = "name: housing\nchannels:\n  - conda-forge\ndependencies:\n  - python=3.11\n"
SCORE = "def init():\n    pass\n\n\ndef run(raw_data):\n    return raw_data\n"


@pytest.fixture(autouse=True)
def _no_cli_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MMS_SERVER", "MMS_TOKEN", "MMS_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def workspace(service: EmbeddedService, owner: dict[str, str]) -> Iterator[Workspace]:  # noqa: F811
    auth = ServicePrincipalAuthentication(owner["clientId"], owner["clientSecret"])
    name = f"acct-{uuid.uuid4().hex[:6]}"
    with Workspace.create(name, service.url, "default", "rg-sdk", auth, location="eastus2") as ws:
        yield ws


def _project(tmp_path: Path) -> Path:
    """The seeds' layout: a source directory with the scoring script, its environment and a helper package."""
    source = tmp_path / "source"
    (source / "helpers").mkdir(parents=True)
    (source / "score.py").write_text(SCORE)
    (source / "myenv.yml").write_text(CONDA)
    (source / "helpers" / "__init__.py").write_text("SCALE = 2\n")
    (source / "labels.txt").write_text("cheap\ndear\n")
    return source


def test_workspace_with_a_service_principal_registers_lists_and_gets_models(
    workspace: Workspace,
    service: EmbeddedService,  # noqa: F811
    owner: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    assert workspace.name.startswith("acct-") and workspace.resource_group == "rg-sdk"
    assert workspace.get_details()["name"] == workspace.name
    assert owner["clientSecret"] not in repr(workspace) + repr(
        ServicePrincipalAuthentication(owner["clientId"], owner["clientSecret"])
    )
    again = Workspace.get(
        workspace.name,
        service.url,
        "default",
        "rg-sdk",
        ServicePrincipalAuthentication(owner["clientId"], owner["clientSecret"]),
    )
    assert again.name == workspace.name
    again.close()

    model_file = tmp_path / "housing.model"
    model_file.write_bytes(b"pickled model")
    first = Model.register(
        workspace=workspace, model_path=model_file, model_name="housing.model", tags=["myTag"], description="my model"
    )
    assert (first.name, first.version, first.tags, first.description) == (
        "housing.model",
        1,
        ["myTag"],
        "my model",
    )
    assert uuid.UUID(first.id)
    # A file is uploaded as it is.
    stored = first.serialize()
    assert stored["unpack"] is False

    folder = tmp_path / "housing-folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.pkl").write_bytes(b"weights")
    (folder / "sub" / "vocab.txt").write_text("a b c")
    second = Model.register(workspace, str(folder), "housing.model", tags={"area": "west"})
    assert second.version == 2 and second.tags == ["area=west"]
    assert second.serialize()["unpack"] is True and second.serialize()["mimeType"] == "application/zip"
    # The folder arrived as a zip of its files.
    token = httpx.post(
        f"{service.url}/oauth2/token",
        data={
            "grant_type": "client_credentials",
            "client_id": owner["clientId"],
            "client_secret": owner["clientSecret"],
        },
    ).json()["access_token"]
    url = second.url or ""
    if url.startswith("/"):
        url = f"{service.url}{url}"
    archive = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert archive.status_code == 200, (url, archive.status_code)
    # Under the folder's own name, as Azure ML keeps a registered folder in AZUREML_MODEL_DIR.
    names = sorted(zipfile.ZipFile(io.BytesIO(archive.content)).namelist())
    assert names == ["housing-folder/model.pkl", "housing-folder/sub/vocab.txt"]

    listed = Model.list(workspace, name="housing.model")
    assert [m.version for m in listed] == [2, 1]
    assert [m.version for m in Model.list(workspace, latest=True)] == [2]
    assert Model(workspace, name="housing.model").id == second.id  # the latest version
    assert Model(workspace, name="housing.model", version=1).id == first.id
    assert Model(workspace, id=first.id).name == "housing.model"

    with pytest.raises(ServiceError) as missing:
        Model(workspace, id=str(uuid.uuid4()))
    assert missing.value.status_code == 404 and missing.value.code == "ModelNotFound"
    assert missing.value.message and missing.value.message in str(missing.value)
    with pytest.raises(ServiceError) as no_version:
        Model(workspace, name="housing.model", version=7)
    assert no_version.value.code == "ModelNotFound"


def test_package_queues_a_build_and_wait_for_creation_follows_it_to_the_end(
    client: Client,  # noqa: F811
    service: EmbeddedService,  # noqa: F811
    owner: dict[str, str],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    # The CLI signed in (`python -m mms_client login ...`) and made an account current.
    ws = Workspace.from_login(client.config_dir)
    request.addfinalizer(ws.close)
    assert ws.service_url == service.url and ws.name == client.json("env", "show")["account"]
    model_file = tmp_path / "housing.model"
    model_file.write_bytes(b"pickled model")
    model = Model.register(workspace=ws, model_path=model_file, model_name="housing.model", tags=["myTag"])

    source = _project(tmp_path)
    inference_config = InferenceConfig(
        entry_script="score.py", runtime="python", conda_file="myenv.yml", source_directory=source
    )
    inference_config.base_image = "myregistry.azurecr.io/mycustomimage:1.0"
    inference_config.base_image_registry.address = "myregistry.azurecr.io"
    inference_config.base_image_registry.username = "username"
    inference_config.base_image_registry.password = "registry-password-123"
    assert "registry-password-123" not in repr(inference_config) + str(inference_config)

    image = Model.package(ws, [model], inference_config, image_name="housing-image")
    assert isinstance(image, Image)
    assert (image.name, image.version, image.creation_state) == ("housing-image", 1, "NotStarted")
    assert image.image_location is None and image.error is None
    manifest = client.json("manifest", "show", "-i", image.manifest_id or "")
    assert manifest["modelIds"] == [model.id] and manifest["driverProgram"] == "score.py"
    # The whole source directory is one archive, the image's app root; the entry script a path in it.
    assert sorted(a["id"] for a in manifest["assets"]) == ["myenv.yml", "source"]
    assert manifest["sourceDirectory"] == "source"
    assert next(a for a in manifest["assets"] if a["id"] == "source")["unPack"] is True
    assert manifest["baseImage"] == "myregistry.azurecr.io/mycustomimage:1.0"
    assert manifest["baseImageRegistry"] == {"address": "myregistry.azurecr.io", "username": "username"}
    assert "registry-password-123" not in str(manifest)
    assert "registry-password-123" not in "".join(capsys.readouterr())

    # No worker runs: the test takes the build and finishes it as a worker does.
    engine = create_engine(f"sqlite:///{service.data_dir / 'mms.db'}")
    factory = sessionmaker(engine)
    image_id = uuid.UUID(image.id)
    location = f"127.0.0.1:{service.port}/acct/housing-image:1"

    def build() -> None:
        time.sleep(1.5)
        with factory.begin() as session:
            lease = claim_build(session, image_id, owner="sdk-test", lease_seconds=60, max_attempts=3)
        assert lease is not None
        writer = BuildLogWriter(factory, image_id, lease.attempt)
        for line in ("step 1/2: FROM the base", "step 2/2: conda env update"):
            writer(line)
            writer.flush()
            time.sleep(1.2)
        writer(f"mms: Succeeded: {location}")
        writer.flush()
        with Session(engine) as session, session.begin():
            assert finish_build(session, lease, state=CreationState.SUCCEEDED, image_location=location, error=None)

    builder = threading.Thread(target=build)
    builder.start()
    try:
        printed = io.StringIO()
        with redirect_stdout(printed):
            image.wait_for_creation(show_output=True, timeout=60)
    finally:
        builder.join(30)
        engine.dispose()
    output = printed.getvalue()
    assert image.creation_state == "Succeeded" and image.image_location == location
    for line in ("step 1/2: FROM the base", "step 2/2: conda env update", f"mms: Succeeded: {location}"):
        assert output.count(line) == 1, output  # each line once: only new bytes are fetched
    assert 'Image creation operation finished for image housing-image:1, operation "Succeeded"' in output
    assert image.get_logs().count("step 1/2") == 1

    # Another look at the same image, by id, and a refresh of the first.
    same = Image(ws, id=image.id)
    same.update_creation_state()
    assert same.creation_state == "Succeeded" and same.version == image.version
    assert [i.id for i in Image.list(ws, manifest_name="housing-image")] == [image.id]

    # A model id the account does not have: the SDK's exception, with the service's code.
    with pytest.raises(ServiceError) as unknown:
        Model.package(ws, [str(uuid.uuid4())], inference_config, image_name="nope")
    assert unknown.value.code == "ModelNotFound" and unknown.value.status_code == 404


def test_a_timeout_returns_with_the_build_still_queued(
    workspace: Workspace,
    tmp_path: Path,
) -> None:
    source = _project(tmp_path)
    config = InferenceConfig(entry_script=source / "score.py")
    image = Model.package(workspace, [], config, image_name="queued")
    started = time.monotonic()
    image.wait_for_creation(timeout=1.5)
    assert image.creation_state == "NotStarted" and time.monotonic() - started >= 1.5
    image.cancel()
    assert image.creation_state == "Cancelled"
