"""The `mms` client, run as a user runs it (a process), against a live service with its own
build worker: the seed's housing flow end to end, and the ways it goes wrong.

It runs as `python -m mms_client` (the `mms` console script's own code): the installed console
script is proven apart, installed alone (tests/packaging/test_client_install.py)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.embedded_service import EmbeddedService, free_port, stop
from tests.external_issuer import ExternalIssuer
from tests.infra import Infra

MMS = [sys.executable, "-m", "mms_client"]  # what the `mms` console script runs
SCORE_PY = """
import json, os, pickle

def init():
    global model
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "housing.model", "model.pkl"), "rb") as f:
        model = pickle.load(f)

def run(raw_data):
    return model.predict(json.loads(raw_data)["data"]).tolist()
"""


@dataclass
class Client:
    """The `mms` command with a config folder of its own."""

    config_dir: Path
    server: str

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 120, traceback: bool = False
    ) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MMS_")}
        environment.update({"MMS_CONFIG_DIR": str(self.config_dir), "COLUMNS": "200", **(env or {})})
        done = subprocess.run([*MMS, *args], env=environment, capture_output=True, text=True, timeout=timeout)
        if not traceback:
            assert "Traceback" not in done.stderr, done.stderr  # failures are one line, never a trace
        return done

    def json(self, *args: str, **kwargs) -> object:
        done = self.run(*args, "-o", "json", **kwargs)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


AUTHORITY = "https://login.example.test/cli-tenant/v2.0"


@pytest.fixture(scope="module")
def authority() -> Iterator[ExternalIssuer]:
    """An AAD-style external authority with a client-credentials token endpoint."""
    with ExternalIssuer.serve(AUTHORITY) as issuer:
        yield issuer


@pytest.fixture(scope="module")
def service(
    infra: Infra,
    authority: ExternalIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmbeddedService]:
    trusted = json.dumps([{"issuer": AUTHORITY, "jwks_uri": authority.jwks_uri}])
    embedded = EmbeddedService.prepare(
        tmp_path_factory.mktemp("cli-data"),
        tmp_path_factory.mktemp("cli-logs"),
        infra.rootfs_tar,
        MMS_TRUSTED_ISSUERS=trusted,
    )
    server = embedded.serve()
    try:
        yield embedded
    finally:
        stop(server)


@pytest.fixture()
def client(service: EmbeddedService, tmp_path: Path) -> Client:
    return Client(tmp_path / "config", service.url)


def _login(client: Client, service: EmbeddedService) -> None:
    done = client.run(
        "login", "--service-principal", "-u", service.client_id, "-p", service.client_secret, "--server", service.url
    )
    assert done.returncode == 0, done.stderr


def test_the_seed_housing_flow_end_to_end(
    client: Client,
    service: EmbeddedService,
    infra: Infra,
    tmp_path: Path,
) -> None:
    from sklearn.linear_model import LinearRegression

    _login(client, service)
    # The secret and token are kept owner-only, and never in the profile.
    config = client.config_dir
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    for name in ("profile.json", "credentials.json"):
        assert stat.S_IMODE((config / name).stat().st_mode) == 0o600
    assert service.client_secret not in (config / "profile.json").read_text()

    account = f"acct-{uuid.uuid4().hex[:6]}"
    created = client.json(
        "account",
        "modelmanagement",
        "create",
        "-l",
        "eastus2",
        "-n",
        account,
        "-g",
        "rg1",
        "--sku-instances",
        "1",
        "--sku-name",
        "S1",
    )
    assert created["name"] == account and created["sku"] == {"name": "S1", "capacity": 1}
    assert client.json("env", "show")["account"] == account

    # A folder is zipped, uploaded and registered; every registration gets the next version.
    rows = [[float(i), float(i % 3)] for i in range(30)]
    trained = LinearRegression().fit(rows, [3.0 * a - b + 2 for a, b in rows])
    folder = tmp_path / "housing.model"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps(trained))
    model = client.json(
        "model", "register", "-m", str(folder), "-n", "housing.model", "-t", "myTag", "-d", "my housing.model"
    )
    assert (model["name"], model["version"], model["tags"]) == ("housing.model", 1, ["myTag"])
    assert client.json("model", "register", "-m", str(folder), "-n", "housing.model")["version"] == 2
    listed = client.json("model", "list", "-n", "housing.model")
    assert [m["version"] for m in listed] == [2, 1]
    table = client.run("model", "list")
    assert table.returncode == 0 and "housing.model" in table.stdout and "myTag" in table.stdout

    import sklearn

    (tmp_path / "score.py").write_text(SCORE_PY)
    (tmp_path / "myconda.yml").write_text(
        f"name: housing\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n    - scikit-learn=={sklearn.__version__}\n"
    )
    manifest = client.json(
        "manifest",
        "create",
        "-n",
        "housingmodel-manifest",
        "-f",
        str(tmp_path / "score.py"),
        "-c",
        str(tmp_path / "myconda.yml"),
        "-r",
        "python",
        "-i",
        model["id"],
    )
    assert manifest["modelIds"] == [model["id"]] and manifest["driverProgram"] == "score.py"

    built = client.run(
        "image",
        "create",
        "-n",
        "housingmodel-image",
        "--manifest-id",
        manifest["id"],
        "--wait",
        "-o",
        "json",
        timeout=900,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    image = json.loads(built.stdout)  # stdout holds the result alone; the log went to stderr
    assert image["CreationState"] == "Succeeded"
    # Started once by the machine's engine: init() found the model where Azure ML puts a
    # registered folder ($AZUREML_MODEL_DIR/housing.model/model.pkl).
    assert image["SmokeTest"] == {"result": "Passed", "reason": None}, built.stderr[-3000:]
    assert "mms: Succeeded" in built.stderr or "done in" in built.stderr
    assert image["ImageLocation"].startswith(f"127.0.0.1:{service.port}/")
    assert client.json("image", "show", "-i", image["Id"])["Digest"] == image["Digest"]
    logs = client.run("image", "logs", "-i", image["Id"])
    assert logs.returncode == 0 and "with the oci builder" in logs.stdout
    assert [b["reference"] for b in client.json("base-image", "list") if b["reference"]]

    # Pullable: the Docker engine pulls it from the service with the same principal.
    repository, _, tag = image["ImageLocation"].rpartition(":")
    login = {"username": service.client_id, "password": service.client_secret}
    with infra.api() as api:
        chunks = list(api.pull(repository, tag=tag, stream=True, decode=True, auth_config=login))
        assert not [c for c in chunks if "error" in c], chunks[-3:]
        api.remove_image(image["ImageLocation"])


def test_a_failed_build_exits_non_zero_with_its_reason(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    _login(client, service)
    client.json("account", "modelmanagement", "create", "-l", "eastus2", "-n", f"f-{uuid.uuid4().hex[:6]}", "-g", "rg1")
    (tmp_path / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return data\n")
    (tmp_path / "requirements.txt").write_text("this-package-does-not-exist-mms==1.0\n")
    manifest = client.json(
        "manifest", "create", "-n", "broken", "-f", str(tmp_path / "score.py"), "-p", str(tmp_path / "requirements.txt")
    )
    failed = client.run("image", "create", "-n", "broken", "--manifest-id", manifest["id"], "--wait", timeout=600)
    assert failed.returncode == 2
    assert "Failed" in failed.stderr and "this-package-does-not-exist-mms" in failed.stderr


def test_a_wrong_secret_is_refused_in_one_line_without_echoing_it(client: Client, service: EmbeddedService) -> None:
    wrong = "not-the-secret-" + uuid.uuid4().hex
    done = client.run("login", "--service-principal", "-u", service.client_id, "-p", wrong, "--server", service.url)
    assert done.returncode == 1
    assert "sign-in refused" in done.stderr and "client id or secret" in done.stderr
    assert wrong not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2  # one message (rich may wrap it)


def test_an_expired_token_is_renewed_and_a_bad_one_is_explained(client: Client, service: EmbeddedService) -> None:
    _login(client, service)
    client.json("account", "modelmanagement", "create", "-l", "eastus2", "-n", f"t-{uuid.uuid4().hex[:6]}", "-g", "rg1")
    credentials_path = client.config_dir / "credentials.json"
    # Expired: renewed before the call, with the cached secret.
    cached = json.loads(credentials_path.read_text())
    credentials_path.write_text(json.dumps({**cached, "expires_at": time.time() - 10}))
    assert client.run("model", "list").returncode == 0
    renewed = json.loads(credentials_path.read_text())
    assert renewed["access_token"] != cached["access_token"] and renewed["expires_at"] > time.time()
    # Refused although not yet expired (the service's keys changed, say): renewed once on the 401.
    credentials_path.write_text(json.dumps({**renewed, "access_token": "not.a.token"}))
    assert client.run("model", "list").returncode == 0
    # A token given in MMS_TOKEN is used as it is: refused, the message says what to do.
    refused = client.run("model", "list", env={"MMS_TOKEN": "expired.or.forged"})
    assert refused.returncode == 1
    assert "refused the token in MMS_TOKEN" in refused.stderr and "mms login" in refused.stderr


def test_an_unknown_model_id_and_an_unreachable_server_are_one_clear_line(
    client: Client, service: EmbeddedService
) -> None:
    _login(client, service)
    client.json("account", "modelmanagement", "create", "-l", "eastus2", "-n", f"u-{uuid.uuid4().hex[:6]}", "-g", "rg1")
    unknown = client.run("model", "show", "-i", str(uuid.uuid4()))
    assert unknown.returncode == 1 and "not found" in unknown.stderr.lower() and "ModelNotFound" in unknown.stderr
    manifest = client.run("manifest", "create", "-n", "m", "-f", __file__, "-i", str(uuid.uuid4()))
    assert manifest.returncode == 1 and "model" in manifest.stderr.lower()

    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = client.run("model", "list", env={"MMS_SERVER": closed})
    assert unreachable.returncode == 1
    assert f"cannot reach the service at {closed}" in unreachable.stderr
    debug = client.run("model", "list", "--debug", env={"MMS_SERVER": closed}, traceback=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug shows where it failed


def test_a_principal_of_an_external_authority_signs_in_there(
    client: Client, service: EmbeddedService, authority: ExternalIssuer
) -> None:
    authority.clients["aad-app"] = ("aad-secret", "aad-object-1")
    granted = service.mms(
        "admin",
        "grant",
        "--issuer",
        AUTHORITY,
        "--subject",
        "aad-object-1",
        "--role",
        "Owner",
        "--scope",
        "/subscriptions/aad-sub",
    )
    assert granted.returncode == 0, granted.stderr
    wrong = client.run(
        "login",
        "--service-principal",
        "-u",
        "aad-app",
        "-p",
        "nope",
        "--server",
        service.url,
        "--subscription",
        "aad-sub",
        "--authority",
        authority.token_url,
        "--scope",
        "mms-api/.default",
    )
    assert wrong.returncode == 1 and "AADSTS7000215" in wrong.stderr
    done = client.run(
        "login",
        "--service-principal",
        "-u",
        "aad-app",
        "-p",
        "aad-secret",
        "--server",
        service.url,
        "--subscription",
        "aad-sub",
        "--authority",
        authority.token_url,
        "--scope",
        "mms-api/.default",
    )
    assert done.returncode == 0, done.stderr
    created = client.json("account", "modelmanagement", "create", "-l", "eastus2", "-n", "aad-acct", "-g", "rg1")
    assert created["properties"]["subscriptionId"] == "aad-sub"
    # Owner of that subscription only: another one is refused, in one line.
    assert client.run("env", "set", "-s", "someone-elses").returncode == 0
    refused = client.run("account", "modelmanagement", "list", "-g", "rg1")
    assert refused.returncode == 1 and "[AuthorizationFailed]" in refused.stderr


def test_without_a_sign_in_or_an_account_the_message_names_the_command(tmp_path: Path) -> None:
    fresh = Client(tmp_path / "config", "http://127.0.0.1:9")
    nothing = fresh.run("model", "list")
    assert nothing.returncode == 1 and "mms login" in nothing.stderr


COMMANDS = [
    ["login"],
    ["logout"],
    ["env", "set"],
    ["env", "show"],
    ["account", "modelmanagement", "create"],
    ["account", "modelmanagement", "set"],
    ["account", "modelmanagement", "show"],
    ["account", "modelmanagement", "list"],
    ["account", "modelmanagement", "delete"],
    ["model", "register"],
    ["model", "list"],
    ["model", "show"],
    ["model", "delete"],
    ["manifest", "create"],
    ["manifest", "list"],
    ["manifest", "show"],
    ["manifest", "delete"],
    ["image", "create"],
    ["image", "show"],
    ["image", "list"],
    ["image", "logs"],
    ["image", "cancel"],
    ["image", "delete"],
    ["base-image", "list"],
    ["compute", "list"],
    ["compute", "show"],
    ["compute", "attach"],
    ["compute", "detach"],
    ["service", "create", "realtime"],
    ["service", "list"],
    ["service", "show"],
    ["service", "keys"],
    ["service", "regen-key"],
    ["service", "update"],
    ["service", "delete"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command: list[str], tmp_path: Path) -> None:
    done = Client(tmp_path, "").run(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "Example: mms " + " ".join(command[:2]) in " ".join(done.stdout.split())
