"""The client sends a source directory as the Azure ML SDK does: the whole folder, one zip asset
(unPack) named by ``sourceDirectory``, and the entry script as its path inside it. The client's
own code against the app (its HTTP client swapped for the app's test client)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.context import ServiceContext
from mms_client.api import CliError, ServiceClient
from mms_client.operations import Uploads, create_manifest, inference_config_body
from mms_client.profile import ConfigStore, Credentials, MemoryStore, Profile
from tests.factories import Callers, new_account
from tests.live_server import live_service
from tests.workers.test_source_directory import project

MMS = [sys.executable, "-m", "mms_client"]


@pytest.fixture()
def service_client(client: TestClient, callers: Callers, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServiceClient]:
    owner = callers.headers()
    account = new_account(client, owner).rsplit("/", 1)[1]
    monkeypatch.setenv("MMS_TOKEN", owner["Authorization"].removeprefix("Bearer "))
    profile = Profile(server="http://testserver", subscription="sub-1", resource_group="rg-1", account=account)
    service = ServiceClient(MemoryStore(profile, Credentials()))
    service._http.close()
    service._http = client  # the app in this test's transaction
    yield service


def test_the_whole_source_directory_is_one_archive_and_the_entry_script_a_path_in_it(
    service_client: ServiceClient, client: TestClient, tmp_path: Path
) -> None:
    source = project(tmp_path)
    (source / "env.yml").write_text("dependencies:\n  - python=3.11\n")
    config = {"entryScript": "score/score.py", "sourceDirectory": "src", "condaFile": "env.yml", "enableGpu": False}
    with Uploads(service_client) as uploads:
        body = inference_config_body(service_client, uploads, config, tmp_path, "sd", [], [])
        manifest = create_manifest(service_client, body)
    assert (body["sourceDirectory"], body["entryScript"], body["condaFile"]) == ("src", "score/score.py", "env.yml")
    [directory, conda] = body["assets"]
    assert directory["id"] == "src" and directory["unPack"] is True and conda["id"] == "env.yml"
    assert (manifest["sourceDirectory"], manifest["driverProgram"]) == ("src", "score/score.py")
    # What the service stored: the tree, without the dot-folder.
    archive = client.get(directory["url"])
    assert archive.status_code == 200
    names = sorted(zipfile.ZipFile(io.BytesIO(archive.content)).namelist())
    assert names == [
        "env.yml",
        "score/score.py",
        "score/weights.py",
        "utils/__init__.py",
        "utils/features.py",
    ]


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [("../outside.py", "is not inside the sourceDirectory"), (".git/score.py", "dot-folder")],
)
def test_an_entry_script_outside_the_uploaded_tree_is_refused_before_any_upload(
    service_client: ServiceClient, tmp_path: Path, entry: str, fragment: str
) -> None:
    source = project(tmp_path)
    (tmp_path / "outside.py").write_text("")
    (source / ".git" / "score.py").write_text("")
    uploads = Uploads(service_client)
    with pytest.raises(CliError, match=fragment):
        inference_config_body(
            service_client, uploads, {"entryScript": entry, "sourceDirectory": "src"}, tmp_path, "sd", [], []
        )
    assert uploads.assets == []


def test_the_command_line_takes_the_source_directory_over_the_configurations(
    service_context: ServiceContext, tmp_path: Path
) -> None:
    source = project(tmp_path)
    config = tmp_path / "config"
    config.mkdir()
    (config / "inference.json").write_text(json.dumps({"entryScript": "score/score.py", "sourceDirectory": "absent"}))
    with live_service(service_context, tmp_path / "data") as live:
        account = live.account()
        store = ConfigStore(tmp_path / "mms")
        store.save_profile(
            Profile(
                server=live.base, subscription="sub-live", resource_group="rg-live", account=account.rsplit("/")[-1]
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
        env |= {"MMS_CONFIG_DIR": str(store.root), "MMS_TOKEN": live.headers["Authorization"].removeprefix("Bearer ")}

        def create(*args: str) -> dict:
            done = subprocess.run(
                [*MMS, "manifest", "create", *args, "-o", "json"], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        from_config = create("-n", "sd-ic", "--ic", str(config / "inference.json"), "--source-directory", str(source))
        from_flags = create("-n", "sd-f", "--source-directory", str(source), "-f", "score/score.py")
    for manifest in (from_config, from_flags):
        assert (manifest["sourceDirectory"], manifest["driverProgram"]) == ("src", "score/score.py")
        assert [(a["id"], a["unPack"]) for a in manifest["assets"]] == [("src", True)]
