"""`mms compute ...` and `mms service ...` (the web-services preview) run as a user runs them
(processes) against a live `mms serve` with MMS_WEB_SERVICES_PREVIEW=true and no worker.

Nothing deploys yet, so a new service stays Transitioning: the tests use --no-wait or a short
--timeout. A Succeeded image is made as a build worker would: the test claims the build and
finishes it through the server's own build transitions on the service's database."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.builds.leases import claim_build, finish_build
from app.builds.states import CreationState
from app.deployments.reconciler import LogLine, Replica, claim, decide, read_spec, record
from app.orm.base import utcnow
from tests.cli.test_first_hour import beside
from tests.embedded_service import EmbeddedService, free_port, stop
from tests.factories import KUBE_TOKEN, kubeconfig_text
from tests.mms_client.test_client import Client

TLS_KEY_MATERIAL = "TOP-SECRET-KEY-MATERIAL"
CERT = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
KEY = f"-----BEGIN PRIVATE KEY-----\n{TLS_KEY_MATERIAL}\n-----END PRIVATE KEY-----\n"
DIGEST = "sha256:" + "d" * 64
SCORE_PY = "def init():\n    pass\n\ndef run(raw_data):\n    return raw_data\n"


def _serve(tmp_path_factory: pytest.TempPathFactory, **settings: str) -> tuple[EmbeddedService, object]:
    """`mms serve` on the embedded default without its build worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMS_") and k != "DOCKER_HOST"}
    port = free_port()
    data_dir = tmp_path_factory.mktemp("services-data")
    env.update({"MMS_DATA_DIR": str(data_dir), "MMS_PORT": str(port), "MMS_LOG_FORMAT": "text", **settings})
    embedded = EmbeddedService(env, port, data_dir, tmp_path_factory.mktemp("services-logs"))
    return embedded, embedded.serve("--no-build-worker")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    embedded, server = _serve(tmp_path_factory, MMS_WEB_SERVICES_PREVIEW="true")
    try:
        yield embedded
    finally:
        stop(server)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def owner(service: EmbeddedService) -> dict[str, str]:
    done = beside(service, "admin", "bootstrap", "-o", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _signed_in(service: EmbeddedService, owner: dict[str, str], config: Path) -> Client:
    client = Client(config, service.url)
    done = client.run(
        "login", "--service-principal", "-u", owner["clientId"], "-p", owner["clientSecret"], "--server", service.url
    )
    assert done.returncode == 0, done.stderr
    client.json("account", "modelmanagement", "create", "-l", "eastus2", "-g", "rg1", "-n", f"a-{uuid.uuid4().hex[:6]}")
    return client


@pytest.fixture()
def client(service: EmbeddedService, owner: dict[str, str], tmp_path: Path) -> Client:
    """A signed-in client with an account of its own."""
    return _signed_in(service, owner, tmp_path / "config")


def _queued_image(client: Client, tmp_path: Path) -> str:
    (tmp_path / "score.py").write_text(SCORE_PY)
    manifest = client.json("manifest", "create", "-n", "scorer", "-f", str(tmp_path / "score.py"))
    return client.json("image", "create", "-n", "scorer", "--manifest-id", manifest["id"], "--no-wait")["Id"]


def _built_image(client: Client, service: EmbeddedService, tmp_path: Path) -> str:
    """A Succeeded image, finished as a build worker would finish it."""
    image_id = _queued_image(client, tmp_path)
    engine = create_engine(f"sqlite:///{service.data_dir / 'mms.db'}")
    try:
        with Session(engine) as session, session.begin():
            lease = claim_build(session, uuid.UUID(image_id), owner="test-worker", lease_seconds=60, max_attempts=3)
            assert lease is not None
            location = f"127.0.0.1:{service.port}/x/scorer@{DIGEST}"
            assert finish_build(session, lease, state=CreationState.SUCCEEDED, image_location=location, digest=DIGEST)
    finally:
        engine.dispose()
    assert client.json("image", "show", "-i", image_id)["CreationState"] == "Succeeded"
    return image_id


def _credential_files(tmp_path: Path) -> dict[str, Path]:
    files = {"ca": CERT, "cert": CERT, "key": KEY, "kubeconfig": kubeconfig_text()}
    for name, text in files.items():
        (tmp_path / f"{name}.pem").write_text(text)
    return {name: tmp_path / f"{name}.pem" for name in files}


def _no_credentials(*texts: str) -> None:
    for text in texts:
        assert TLS_KEY_MATERIAL not in text and KUBE_TOKEN not in text and "BEGIN" not in text, text


def test_swarm_and_kubernetes_targets_are_attached_listed_shown_and_detached_without_their_credentials(
    client: Client, tmp_path: Path
) -> None:
    files = _credential_files(tmp_path)
    swarm = client.run(
        "compute", "attach", "-n", "myswarm", "--type", "swarm", "--docker-host", "tcp://swarm.example.com:2376",
        "--tls-ca", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
        "-o", "json", "--debug",
    )  # fmt: skip
    assert swarm.returncode == 0, swarm.stderr
    assert json.loads(swarm.stdout) | {"createdTime": None} == {
        "name": "myswarm",
        "type": "swarm",
        "properties": {"dockerHost": "tcp://swarm.example.com:2376", "namespace": None},
        "builtIn": False,
        "hasCredentials": True,
        "createdTime": None,
    }
    # --debug shows the request's body with the key as *** (the certificates are not secret).
    assert '"key": "***"' in swarm.stderr and "MIIBfake" in swarm.stderr
    assert TLS_KEY_MATERIAL not in swarm.stdout + swarm.stderr

    kube = client.run(
        "compute", "attach", "-n", "mykube", "--type", "kubernetes", "--kubeconfig", str(files["kubeconfig"]),
        "--namespace", "scoring", "-o", "json", "--debug",
    )  # fmt: skip
    assert kube.returncode == 0, kube.stderr
    attached = json.loads(kube.stdout)
    assert (attached["type"], attached["properties"]["namespace"], attached["hasCredentials"]) == (
        "kubernetes",
        "scoring",
        True,
    )
    assert '"kubeconfig": "***"' in kube.stderr and KUBE_TOKEN not in kube.stdout + kube.stderr

    listed = client.json("compute", "list")
    assert [(c["name"], c["type"], c["builtIn"]) for c in listed] == [
        ("local", "local", True),
        ("mykube", "kubernetes", False),
        ("myswarm", "swarm", False),
    ]
    table = client.run("compute", "list")
    shown = client.run("compute", "show", "-n", "myswarm")
    assert table.returncode == shown.returncode == 0
    assert "tcp://swarm.example.com:2376" in table.stdout and "myswarm" in shown.stdout
    _no_credentials(table.stdout, shown.stdout, client.run("compute", "list", "-o", "yaml").stdout)
    assert client.json("compute", "show", "-n", "mykube")["properties"]["namespace"] == "scoring"

    for name in ("myswarm", "mykube"):
        detached = client.run("compute", "detach", "-n", name)
        assert detached.returncode == 0 and f"Detached compute {name}" in detached.stderr
    gone = client.run("compute", "show", "-n", "myswarm")
    assert gone.returncode == 1 and "ComputeNotFound" in gone.stderr
    assert [c["name"] for c in client.json("compute", "list")] == ["local"]
    local = client.run("compute", "detach", "-n", "local")
    assert local.returncode == 1 and "BuiltInCompute" in local.stderr


def test_a_bad_compute_attach_is_one_clear_line_and_a_non_zero_exit(client: Client, tmp_path: Path) -> None:
    files = _credential_files(tmp_path)
    tls = ["--tls-ca", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    attach = ["compute", "attach", "-n", "t1"]
    cases = [
        ([*attach, "--type", "aci"], 2, "--type: 'aci' cannot be attached"),
        ([*attach, "--type", "swarm", "--docker-host", "tcp://h:2376", *tls[:4]], 2, "needs --tls-key"),
        ([*attach, "--type", "swarm", "--kubeconfig", str(files["kubeconfig"])], 2, "--kubeconfig: not for a swarm"),
        ([*attach, "--type", "kubernetes"], 2, "needs --kubeconfig"),
        ([*attach, "--type", "kubernetes", "--kubeconfig", str(tmp_path / "nope")], 1, "--kubeconfig: "),
        ([*attach, "--type", "kubernetes", "--kubeconfig", str(tmp_path)], 1, "is a folder"),
        # The service's own 400s name the field.
        ([*attach, "--type", "swarm", "--docker-host", "http://h:2376", *tls], 1, "properties.dockerHost"),
        ([*attach, "--type", "swarm", "--docker-host", "tcp://h:2376", *tls[:4], "--tls-key", __file__], 1, "key"),
    ]
    for args, code, message in cases:
        done = client.run(*args)
        assert (done.returncode, message in done.stderr) == (code, True), (args, done.stderr)
        _no_credentials(done.stdout, done.stderr)
    assert [c["name"] for c in client.json("compute", "list")] == ["local"]


def test_a_service_is_created_listed_shown_keyed_refused_an_update_and_deleted(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    image_id = _built_image(client, service, tmp_path)
    created = client.json(
        "service", "create", "realtime", "--image-id", image_id, "-n", "housing-svc",
        "--replicas", "2", "--cpu", "0.5", "--memory-gb", "1", "--no-auth", "--no-wait",
    )  # fmt: skip
    assert created["state"] == "Transitioning" and created["name"] == "housing-svc"
    assert (created["computeName"], created["computeType"], created["imageId"]) == ("local", "local", image_id)
    assert (created["numReplicas"], created["authEnabled"]) == (2, False)
    assert created["containerResourceRequirements"] == {"cpu": 0.5, "memoryInGB": 1.0}
    assert created["deploymentStatus"] == {"desiredReplicas": 2, "readyReplicas": 0}
    assert created["scoringUri"] is None and created["operationId"]

    listed = client.json("service", "list")
    assert [(s["name"], s["id"], s["state"]) for s in listed] == [("housing-svc", created["id"], "Transitioning")]
    assert client.json("service", "list", "--ct", "local", "--image-id", image_id) == listed
    assert client.json("service", "list", "--ct", "elsewhere") == []
    by_name, by_id = (
        client.json("service", "show", "-n", "housing-svc"),
        client.json("service", "show", "-i", created["id"]),
    )
    assert by_name["id"] == by_id["id"] == created["id"]
    table = client.run("service", "show", "-n", "housing-svc")
    assert table.returncode == 0 and "Transitioning" in table.stdout and "0/2" in table.stdout
    assert (
        client.run("service", "show", "-n", "housing-svc", "--query", "state", "-o", "tsv").stdout == "Transitioning\n"
    )

    keys = client.json("service", "keys", "-n", "housing-svc")
    assert set(keys) == {"primaryKey", "secondaryKey"} and keys["primaryKey"] != keys["secondaryKey"]
    renewed = client.json("service", "regen-key", "-n", "housing-svc", "--key", "primary")
    assert renewed["primaryKey"] != keys["primaryKey"] and renewed["secondaryKey"] == keys["secondaryKey"]
    assert client.json("service", "keys", "-i", created["id"]) == renewed
    second = client.json("service", "regen-key", "-i", created["id"], "--key", "Secondary")
    assert second["secondaryKey"] != keys["secondaryKey"] and second["primaryKey"] == renewed["primaryKey"]

    # Nothing deploys yet: the service never leaves Transitioning, so every change is refused.
    busy = client.run("service", "update", "-n", "housing-svc", "--replicas", "1", "--no-wait")
    assert busy.returncode == 1 and "ServiceBusy" in busy.stderr and "Transitioning" in busy.stderr
    nothing = client.run("service", "update", "-n", "housing-svc")
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr

    deleting = client.json("service", "delete", "-n", "housing-svc", "--no-wait")
    assert (deleting["id"], deleting["state"]) == (created["id"], "Deleting")
    assert client.json("service", "show", "-n", "housing-svc")["state"] == "Deleting"
    refused = client.run("service", "regen-key", "-n", "housing-svc", "--key", "primary")
    assert refused.returncode == 1 and "ServiceDeleting" in refused.stderr


def test_service_logs_prints_the_newest_lines_the_reconciler_copied(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    image_id = _built_image(client, service, tmp_path)
    created = client.json("service", "create", "realtime", "--image-id", image_id, "-n", "logged", "--no-wait")
    assert client.run("service", "logs", "-n", "logged").stdout == ""
    # Lines as a reconciler pass writes them (no deploy worker runs here).
    engine = create_engine(f"sqlite:///{service.data_dir / 'mms.db'}")
    try:
        with Session(engine) as session, session.begin():
            lease = claim(session, uuid.UUID(created["id"]), owner="test-worker")
            assert lease is not None
            spec = read_spec(session, lease)
            assert spec is not None
            replica = Replica("c0ffee" * 10, 1, image_id, "10.213.0.2:5001", alive=True, ready=False)
            lines = [LogLine(replica.id, 1, n, f"line {n} <script>") for n in range(1, 6)]
            assert record(session, lease, spec, decide(spec, [], now=utcnow(), start_seconds=60, drain_seconds=1),
                          [], now=utcnow(), scoring_url="http://127.0.0.1:8001", lines=lines)  # fmt: skip
    finally:
        engine.dispose()
    shown = client.run("service", "logs", "-n", "logged", "--tail", "2")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == "g1 c0ffeec0ffee line 4 <script>\ng1 c0ffeec0ffee line 5 <script>\n"
    assert client.run("service", "logs", "-i", created["id"]).stdout.count("\n") == 5


def test_waiting_is_bounded_by_the_timeout_and_says_the_service_is_still_transitioning(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    image_id = _built_image(client, service, tmp_path)
    started = time.monotonic()
    waited = client.run(
        "service", "create", "realtime", "--image-id", image_id, "-n", "slow", "--timeout", "3", "-o", "json"
    )
    assert time.monotonic() - started < 30
    assert waited.returncode == 4, waited.stderr
    assert "service slow is still Transitioning after 3 s" in waited.stderr
    assert json.loads(waited.stdout)["state"] == "Transitioning"  # stdout holds the result alone

    gone = client.run("service", "delete", "-n", "slow", "--timeout", "2")
    assert gone.returncode == 4 and "service slow is still Deleting after 2 s" in gone.stderr


def _attached_swarm(client: Client, tmp_path: Path, name: str = "theirs") -> None:
    """A swarm the account attached; no worker here, so it never answers, as one gone for good."""
    files = _credential_files(tmp_path)
    attached = client.run(
        "compute", "attach", "-n", name, "--type", "swarm", "--docker-host", "tcp://swarm.example.com:2376",
        "--tls-ca", str(files["ca"]), "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
    )  # fmt: skip
    assert attached.returncode == 0, attached.stderr


def test_a_service_stuck_deleting_on_an_attached_target_is_removed_at_once_with_force(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    """No worker deletes anything here, as with a target that never answers: --force ends it."""
    image_id = _built_image(client, service, tmp_path)
    _attached_swarm(client, tmp_path)
    on_theirs = ("--image-id", image_id, "--ct", "theirs", "--no-auth", "--no-wait")
    created = client.json("service", "create", "realtime", *on_theirs, "-n", "stuck")
    stuck = client.run("service", "delete", "-n", "stuck", "--timeout", "1")
    assert stuck.returncode == 4 and "still Deleting" in stuck.stderr
    started = time.monotonic()
    forced = client.run("service", "delete", "-n", "stuck", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "Deleted service stuck." in forced.stderr and time.monotonic() - started < 30
    missing = client.run("service", "show", "-i", created["id"])
    assert missing.returncode == 1 and "ServiceNotFound" in missing.stderr
    assert client.json("service", "list") == []
    # A service not yet Deleting (Transitioning here) is forced at once too.
    again = client.json("service", "create", "realtime", *on_theirs, "-n", "stuck")
    assert client.run("service", "delete", "-i", again["id"], "--force").returncode == 0
    assert client.json("service", "list") == []


def test_force_is_refused_on_a_built_in_target_and_the_service_left_as_it_was(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    image_id = _built_image(client, service, tmp_path)
    created = client.json("service", "create", "realtime", "--image-id", image_id, "-n", "mine", "--no-wait")
    refused = client.run("service", "delete", "-n", "mine", "--force")
    assert refused.returncode == 1 and "ForceDeleteNotAllowed" in refused.stderr, refused.stderr
    assert "without force" in refused.stderr and "Deleted" not in refused.stderr
    assert [(s["id"], s["state"]) for s in client.json("service", "list")] == [(created["id"], "Transitioning")]


def test_a_deploymentconfig_json_maps_onto_the_deployment_config_and_options_override_it(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    image_id = _built_image(client, service, tmp_path)
    config = tmp_path / "deploymentconfig.json"
    config.write_text(
        json.dumps(
            {
                "computeType": "local",
                "containerResourceRequirements": {"cpu": 1, "memoryInGB": 2},
                "numReplicas": 2,
                "authEnabled": False,
                "scoringTimeoutMs": 5000,
                "appInsightsEnabled": True,
            }
        )
    )
    done = client.run(
        "service", "create", "realtime", "--image-id", image_id, "-n", "from-file", "--dc", str(config),
        "--replicas", "3", "--memory-gb", "1.5", "--no-wait", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert (created["numReplicas"], created["authEnabled"], created["scoringTimeoutMs"]) == (3, False, 5000)
    assert created["containerResourceRequirements"] == {"cpu": 1.0, "memoryInGB": 1.5}
    assert "ignored here: appInsightsEnabled" in done.stderr

    # An AKS file on the local target: the service says the types differ, naming the field.
    config.write_text(json.dumps({"computeType": "aks", "numReplicas": 1}))
    aks = client.run("service", "create", "realtime", "--image-id", image_id, "-n", "aks-file", "--dc", str(config))
    assert aks.returncode == 1 and "computeType" in aks.stderr and "local target, not kubernetes" in aks.stderr
    config.write_text(json.dumps({"computeType": "ACI"}))
    aci = client.run("service", "create", "realtime", "--image-id", image_id, "-n", "aci-file", "--dc", str(config))
    assert aci.returncode == 1 and "computeType 'ACI' is not a target here" in aci.stderr
    config.write_text("{not json")
    broken = client.run("service", "create", "realtime", "--image-id", image_id, "-n", "broken", "--dc", str(config))
    assert broken.returncode == 1 and "is not JSON" in broken.stderr
    assert [s["name"] for s in client.json("service", "list")] == ["from-file"]


def test_bad_service_input_is_one_clear_line_and_a_non_zero_exit(
    client: Client, service: EmbeddedService, tmp_path: Path
) -> None:
    queued = _queued_image(client, tmp_path)
    ic = tmp_path / "inferenceconfig.json"
    ic.write_text('{"entryScript": "score.py"}')
    create = ["service", "create", "realtime", "--no-wait"]
    cases = [
        ([*create, "--image-id", queued, "-n", "svc"], 1, "ImageNotReady"),
        ([*create, "--image-id", str(uuid.uuid4()), "-n", "svc"], 1, "not found"),
        ([*create, "--image-id", queued, "-n", "Bad_Name"], 1, "name"),
        ([*create, "--image-id", queued, "-n", "svc", "--replicas", "2", "--autoscale-min", "1"], 2, "choose one"),
        ([*create, "--image-id", queued, "-n", "svc", "--ct", "nowhere"], 1, "ComputeNotFound"),
        (["service", "show", "-n", "missing"], 1, "no service named 'missing'"),
        (["service", "show", "-i", str(uuid.uuid4())], 1, "not found"),
        (["service", "show"], 2, "-n NAME or -i ID"),
        (["service", "keys", "-n", "a", "-i", "b"], 2, "-n NAME or -i ID"),
        (["service", "regen-key", "-n", "missing", "--key", "tertiary"], 2, "give primary or secondary"),
        (["model", "deploy", "-n", "svc", "-m", "housing.model:1", "--ic", "ic.json"], 2, "--ic ic.json: not a JSON"),
        (["model", "deploy", "-n", "svc", "-m", "housing.model:1", "--ic", str(ic)], 2, "no model 'housing.model'"),
    ]
    for args, code, message in cases:
        done = client.run(*args)
        assert (done.returncode, message in done.stderr) == (code, True), (args, done.stderr)
    image_id = _built_image(client, service, tmp_path)
    autoscaled = client.run(
        *create, "--image-id", image_id, "-n", "svc", "--autoscale-min", "1", "--autoscale-max", "3"
    )
    assert autoscaled.returncode == 1 and "deploymentConfig.autoScaler.autoscaleEnabled" in autoscaled.stderr
    too_big = client.run(*create, "--image-id", image_id, "-n", "svc", "--cpu", "64")
    assert too_big.returncode == 1 and "deploymentConfig.containerResourceRequirements.cpu" in too_big.stderr
    assert client.json("service", "list") == []


def test_debug_shows_the_calls_with_the_keys_redacted(client: Client, service: EmbeddedService, tmp_path: Path) -> None:
    image_id = _built_image(client, service, tmp_path)
    client.json("service", "create", "realtime", "--image-id", image_id, "-n", "keyed", "--no-wait")
    keys = client.run("service", "keys", "-n", "keyed", "--debug", "-o", "json")
    assert keys.returncode == 0, keys.stderr
    shown = json.loads(keys.stdout)  # the command's result is the keys: only stdout has them
    assert '"primaryKey": "***"' in keys.stderr and '"secondaryKey": "***"' in keys.stderr
    assert shown["primaryKey"] not in keys.stderr and shown["secondaryKey"] not in keys.stderr
    regen = client.run("--debug", "service", "regen-key", "-n", "keyed", "--key", "secondary", "-o", "json")
    assert regen.returncode == 0 and "regenerateKeys" in regen.stderr
    assert json.loads(regen.stdout)["secondaryKey"] not in regen.stderr


def test_a_service_without_the_preview_says_so(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    plain, server = _serve(tmp_path_factory)
    try:
        bootstrap = beside(plain, "admin", "bootstrap", "-o", "json")
        assert bootstrap.returncode == 0, bootstrap.stderr
        client = _signed_in(plain, json.loads(bootstrap.stdout), tmp_path / "config")
        for args in (["compute", "list"], ["service", "list"], ["service", "show", "-n", "x"]):
            done = client.run(*args)
            assert done.returncode == 1 and "MMS_WEB_SERVICES_PREVIEW=true" in done.stderr, (args, done.stderr)
    finally:
        stop(server)  # type: ignore[arg-type]


def test_the_sdk_webservice_reads_a_service_and_its_keys(
    client: Client, service: EmbeddedService, owner: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mms_client import ServiceError, ServicePrincipalAuthentication, Webservice, Workspace

    for name in ("MMS_SERVER", "MMS_TOKEN", "MMS_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    image_id = _built_image(client, service, tmp_path)
    created = client.json("service", "create", "realtime", "--image-id", image_id, "-n", "sdk-svc", "--no-wait")
    account = client.json("env", "show")["account"]
    auth = ServicePrincipalAuthentication(owner["clientId"], owner["clientSecret"])
    with Workspace(service.url, "default", "rg1", account, auth) as ws:
        found = Webservice(ws, name="sdk-svc")
        assert (found.id, found.state, found.compute_type, found.image_id) == (
            created["id"],
            "Transitioning",
            "local",
            image_id,
        )
        assert found.scoring_uri is None and found.auth_enabled is True
        primary, secondary = found.get_keys()
        found.regen_key("Primary")
        assert found.get_keys()[0] != primary and found.get_keys()[1] == secondary
        assert primary not in repr(found) + json.dumps(found.serialize())
        assert [s.name for s in Webservice.list(ws)] == ["sdk-svc"] and Webservice.list(ws, compute_type="swarm") == []
        started = time.monotonic()
        found.wait_for_deployment(timeout=1)
        assert found.state == "Transitioning" and time.monotonic() - started < 15
        found.delete()
        assert found.state == "Deleting" and Webservice(ws, id=created["id"]).state == "Deleting"
        with pytest.raises(ServiceError) as refused:  # local: its plain delete always completes
            found.delete(force=True)
        assert (refused.value.code, refused.value.status_code) == ("ForceDeleteNotAllowed", 409)
        assert Webservice(ws, id=created["id"]).state == "Deleting"
        _attached_swarm(client, tmp_path)
        theirs = client.json(
            "service", "create", "realtime", "--image-id", image_id, "-n", "sdk-theirs", "--ct", "theirs",
            "--no-auth", "--no-wait",
        )  # fmt: skip
        Webservice(ws, id=theirs["id"]).delete(force=True)  # its target never answers (no worker here): gone at once
        with pytest.raises(ServiceError) as forced:
            Webservice(ws, id=theirs["id"])
        assert (forced.value.code, forced.value.status_code) == ("ServiceNotFound", 404)
        with pytest.raises(ServiceError) as missing:
            Webservice(ws, name="nope")
        assert (missing.value.code, missing.value.status_code) == ("ServiceNotFound", 404)


def test_the_sdk_deploys_an_image_with_a_deploy_configuration_and_updates_it(
    client: Client, service: EmbeddedService, owner: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Azure ML SDK v1's way: ``Webservice.deploy_from_image`` with
    ``LocalWebservice.deploy_configuration(...)``, then ``update``."""
    from app.deployments.transitions import Transition, move
    from app.orm import Service
    from mms_client import (
        AksWebservice,
        LocalWebservice,
        ServiceError,
        ServicePrincipalAuthentication,
        Webservice,
        Workspace,
    )

    for name in ("MMS_SERVER", "MMS_TOKEN", "MMS_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    image_id = _built_image(client, service, tmp_path)
    account = client.json("env", "show")["account"]
    auth = ServicePrincipalAuthentication(owner["clientId"], owner["clientSecret"])
    config = LocalWebservice.deploy_configuration(
        cpu_cores=0.5, memory_gb=1, num_replicas=2, auth_enabled=False, scoring_timeout_ms=5000
    )
    assert config.as_document() == {
        "computeType": "local",
        "containerResourceRequirements": {"cpu": 0.5, "memoryInGB": 1},
        "numReplicas": 2,
        "authEnabled": False,
        "scoringTimeoutMs": 5000,
    }
    autoscaled = AksWebservice.deploy_configuration(autoscale_enabled=True, autoscale_max_replicas=4)
    assert autoscaled.as_document() == {
        "computeType": "kubernetes",
        "autoScaler": {"autoscaleEnabled": True, "maxReplicas": 4},
    }
    with pytest.raises(ServiceError, match="num_replicas cannot be given with autoscale_enabled"):
        AksWebservice.deploy_configuration(autoscale_enabled=True, num_replicas=2)
    with Workspace(service.url, "default", "rg1", account, auth) as ws:
        deployed = Webservice.deploy_from_image(ws, "sdk-config", image_id, config)
        record = deployed.serialize()
        assert (deployed.state, deployed.compute_type, deployed.auth_enabled) == ("Transitioning", "local", False)
        assert record["containerResourceRequirements"] == {"cpu": 0.5, "memoryInGB": 1.0}
        assert (record["numReplicas"], record["scoringTimeoutMs"]) == (2, 5000)
        # A kubernetes configuration is not one for the local target: the service says so.
        with pytest.raises(ServiceError) as wrong_target:
            Webservice.deploy_from_image(ws, "sdk-wrong", image_id, autoscaled)
        assert wrong_target.value.status_code == 400 and "computeType" in str(wrong_target.value)
        with pytest.raises(ServiceError) as busy:
            deployed.update(num_replicas=1)
        assert (busy.value.code, busy.value.status_code) == ("ServiceBusy", 409)
        with pytest.raises(ServiceError, match="give at least one of"):
            deployed.update()

        # Settled, as a reconciler pass would leave it (no deploy worker runs here).
        engine = create_engine(f"sqlite:///{service.data_dir / 'mms.db'}")
        try:
            with Session(engine) as session, session.begin():
                assert move(session, Transition.CONVERGE, Service.id == uuid.UUID(deployed.id), traffic_generation=1)
        finally:
            engine.dispose()
        deployed.update(cpu_cores=0.25, auth_enabled=True)
        record = deployed.serialize()
        assert deployed.state == "Transitioning" and deployed.auth_enabled is True
        assert record["containerResourceRequirements"] == {"cpu": 0.25, "memoryInGB": 1.0}  # memory kept
        deployed.delete()
