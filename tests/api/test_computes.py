"""Compute targets through the API: `local` built in, swarm and kubernetes attached with their
credentials sealed (never answered, never stored in plain form), 400s naming the field (the
kubeconfig policy's own cases: tests/deployments/test_kubeconfig.py), roles."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings, get_settings
from app.context import ServiceContext
from app.main import create_app
from app.orm import Compute
from tests.factories import KUBE_TOKEN, Callers, client_with, kubeconfig_text, new_account
from workers.fetch_policy import fetch_policy
from workers.fetcher import FetchError, check_url

CERT = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nTOP-SECRET-KEY-MATERIAL\n-----END PRIVATE KEY-----\n"
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://k8s.example.com:6443
    certificate-authority-data: TFMwdExT
users:
- name: u
  user:
    token: kube-token-never-shown
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
"""


def swarm(host: str = "tcp://swarm.example.com:2376") -> dict:
    return {"type": "swarm", "properties": {"dockerHost": host, "tls": {"ca": CERT, "cert": CERT, "key": KEY}}}


def kubernetes(kubeconfig: str = KUBECONFIG, namespace: str | None = "scoring") -> dict:
    properties = {"kubeconfig": kubeconfig} | ({"namespace": namespace} if namespace else {})
    return {"type": "kubernetes", "properties": properties}


def test_local_is_listed_in_every_account_and_cannot_be_attached_or_detached(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    listed = client.get(f"{account}/computes", headers=owner)
    assert listed.status_code == 200
    assert listed.json()["value"] == [
        {
            "name": "local",
            "type": "local",
            "properties": {"dockerHost": None, "namespace": None},
            "builtIn": True,
            "hasCredentials": False,
            "createdTime": None,
        }
    ]
    assert client.get(f"{account}/computes/local", headers=owner).json()["builtIn"] is True
    for response in (
        client.put(f"{account}/computes/local", json=swarm(), headers=owner),
        client.delete(f"{account}/computes/local", headers=owner),
    ):
        assert (response.status_code, response.json()["code"]) == (409, "BuiltInCompute")


def test_without_an_engine_there_is_no_local_target(
    app_context: ServiceContext, owner: dict[str, str], account: str
) -> None:

    settings = app_context.settings.model_copy(update={"local_compute": False})
    context = ServiceContext.build(
        settings,
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )
    client = TestClient(create_app(context=context), base_url="http://testserver")
    assert client.get(f"{account}/computes", headers=owner).json()["value"] == []
    missing = client.get(f"{account}/computes/local", headers=owner)
    assert (missing.status_code, missing.json()["code"]) == (404, "ComputeNotFound")


def test_a_swarm_target_is_attached_replaced_and_detached_and_its_tls_key_never_shown(
    client: TestClient, owner: dict[str, str], account: str, db: Session
) -> None:
    created = client.put(f"{account}/computes/myswarm", json=swarm(), headers=owner)
    assert created.status_code == 201, created.text
    assert created.json() | {"createdTime": None} == {
        "name": "myswarm",
        "type": "swarm",
        "properties": {"dockerHost": "tcp://swarm.example.com:2376", "namespace": None},
        "builtIn": False,
        "hasCredentials": True,
        "createdTime": None,
    }
    replaced = client.put(f"{account}/computes/myswarm", json=swarm("tcp://swarm-2.example.com:2376"), headers=owner)
    assert replaced.status_code == 200
    assert replaced.json()["properties"]["dockerHost"] == "tcp://swarm-2.example.com:2376"
    answers = [
        created.text,
        replaced.text,
        client.get(f"{account}/computes", headers=owner).text,
        client.get(f"{account}/computes/myswarm", headers=owner).text,
    ]
    assert not any("SECRET" in a or "BEGIN" in a for a in answers)
    # Stored sealed: the key material is nowhere in the row.
    row = db.scalars(select(Compute).where(Compute.name == "myswarm")).one()
    assert "TOP-SECRET" not in repr((row.properties, row.sealed_credentials))
    assert [c["name"] for c in client.get(f"{account}/computes", headers=owner).json()["value"]] == [
        "local",
        "myswarm",
    ]
    assert client.delete(f"{account}/computes/myswarm", headers=owner).status_code == 204
    gone = client.get(f"{account}/computes/myswarm", headers=owner)
    assert (gone.status_code, gone.json()["code"]) == (404, "ComputeNotFound")
    assert client.delete(f"{account}/computes/myswarm", headers=owner).status_code == 404


def test_a_kubernetes_target_keeps_its_namespace_and_hides_its_kubeconfig(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    created = client.put(f"{account}/computes/aks1", json=kubernetes(), headers=owner)
    assert created.status_code == 201, created.text
    assert created.json()["properties"] == {"dockerHost": None, "namespace": "scoring"}
    defaulted = client.put(f"{account}/computes/aks2", json=kubernetes(namespace=None), headers=owner)
    assert defaulted.json()["properties"]["namespace"] == "default"
    assert "kube-token" not in client.get(f"{account}/computes", headers=owner).text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "local"}, "type"),
        ({"type": "docker"}, "type"),
        (swarm("unix:///var/run/docker.sock"), "properties.dockerHost"),
        (swarm("ssh://root@host"), "properties.dockerHost"),
        (swarm("tcp://host"), "properties.dockerHost"),
        (swarm("tcp://host:2376/var/run/docker.sock"), "properties.dockerHost"),
        (swarm("tcp://host:2376?cert=/etc/mms/client.pem"), "properties.dockerHost"),
        (swarm("tcp://host:2376#/etc/mms/client.pem"), "properties.dockerHost"),
        (swarm("tcp://user:secret@host:2376"), "properties.dockerHost"),
        ({"type": "swarm", "properties": {"dockerHost": "tcp://h:2376"}}, "properties.tls"),
        (
            {
                "type": "swarm",
                "properties": {"dockerHost": "tcp://h:2376", "tls": {"ca": "x", "cert": CERT, "key": KEY}},
            },
            "properties.tls.ca",
        ),
        ({"type": "kubernetes", "properties": {}}, "properties.kubeconfig"),
        (kubernetes("just: [text"), "properties.kubeconfig"),
        (kubernetes("users: []"), "properties.kubeconfig"),
        (kubernetes(namespace="Not_A_Label"), "properties.namespace"),
        ({"type": "kubernetes", "properties": {"kubeconfig": KUBECONFIG, "dockerHost": "tcp://h:1"}}, "properties"),
    ],
)
def test_bad_targets_are_400s_naming_the_field(
    client: TestClient, owner: dict[str, str], account: str, body: dict, field: str
) -> None:
    response = client.put(f"{account}/computes/bad", json=body, headers=owner)
    assert response.status_code == 400, response.text
    assert any(d["message"].startswith(f"{field}:") for d in response.json()["details"]), response.json()


@pytest.mark.parametrize(
    ("cluster", "user", "field", "reason"),
    [
        ("", "exec:\n  command: /bin/sh\n  apiVersion: x\n", "users[0].user.exec", "runs a command on the worker"),
        ("", "auth-provider:\n  name: gcp\n", "users[0].user.auth-provider", "runs a credential plugin"),
        ("", "tokenFile: /var/run/secrets/token\n", "users[0].user.tokenFile", "reads a file on the worker"),
        ("", "client-key: /etc/mms/secret.key\n", "users[0].user.client-key", "reads a file on the worker"),
        ("certificate-authority: /etc/passwd\n", "", "clusters[0].cluster.certificate-authority", "reads a file"),
        ("proxy-url: http://10.0.0.1:3128\n", "", "clusters[0].cluster.proxy-url", "through another host"),
        ("", "client-key-file: /etc/mms/secret.key\n", "users[0].user.client-key-file", "not a field this service"),
        ("insecure-skip-tls-verify: true\n", "", "clusters[0].cluster.insecure-skip-tls-verify", "MMS_KUBERNETES_"),
    ],
    ids=[
        "exec",
        "auth-provider",
        "tokenFile",
        "client-key-path",
        "ca-path",
        "proxy-url",
        "unknown-key",
        "insecure-tls",
    ],
)
def test_a_hostile_kubeconfig_is_a_400_naming_the_field(
    client: TestClient, owner: dict[str, str], account: str, cluster: str, user: str, field: str, reason: str
) -> None:
    response = client.put(
        f"{account}/computes/evil", json=kubernetes(kubeconfig_text(cluster=cluster, user=user)), headers=owner
    )
    assert response.status_code == 400, response.text
    [detail] = response.json()["details"]
    assert detail["code"] == "InvalidField"
    assert detail["message"].startswith(f"properties.kubeconfig: {field} "), detail
    assert reason in detail["message"]
    assert response.json()["message"] == f"Invalid request: {detail['message']}"
    assert KUBE_TOKEN not in response.text
    assert client.get(f"{account}/computes/evil", headers=owner).status_code == 404


def test_a_plain_http_server_is_a_400_that_does_not_echo_the_url(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    kubeconfig = kubeconfig_text(server="http://admin:hunter2@20.43.0.10:8080")
    response = client.put(f"{account}/computes/plain", json=kubernetes(kubeconfig), headers=owner)
    assert response.status_code == 400
    [detail] = response.json()["details"]
    assert detail["message"] == "properties.kubeconfig: clusters[0].cluster.server must be an https:// URL"
    assert "hunter2" not in response.text


def test_a_yaml_alias_bomb_is_answered_at_once(client: TestClient, owner: dict[str, str], account: str) -> None:
    # Nine levels of nine aliases: 9**9 strings if anything expanded it, under 1 KB as sent.
    anchors = ", ".join(
        ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 9)]
    )
    bomb = f"apiVersion: v1\nkind: Config\npreferences: {{{anchors}}}\nclusters: *l8\n"
    started = time.monotonic()
    response = client.put(f"{account}/computes/bomb", json=kubernetes(bomb), headers=owner)
    assert time.monotonic() - started < 2.0
    assert response.status_code == 400
    assert response.json()["details"][0]["message"] == "properties.kubeconfig: clusters[0] must be a mapping"
    nested = "extensions: " + "[" * 5000 + "]" * 5000
    response = client.put(f"{account}/computes/deep", json=kubernetes(nested), headers=owner)
    assert response.status_code == 400
    assert response.json()["details"][0]["message"].startswith("properties.kubeconfig: nests deeper than")


def test_the_api_leaves_the_servers_address_to_the_worker_and_insecure_tls_to_the_setting(
    app_context: ServiceContext, client: TestClient, owner: dict[str, str], account: str
) -> None:
    """A private server is judged by the worker's fetch policy when it connects, not here."""
    private = client.put(
        f"{account}/computes/onprem", json=kubernetes(kubeconfig_text(server="https://10.0.0.1:6443")), headers=owner
    )
    assert private.status_code == 201, private.text

    settings = app_context.settings.model_copy(update={"kubernetes_allow_insecure_tls": True})
    context = ServiceContext.build(
        settings,
        engine=app_context.engine,
        session_factory=app_context.session_factory,
        read_session_factory=app_context.read_session_factory,
    )
    allowing = TestClient(create_app(context=context), base_url="http://testserver")
    insecure = kubernetes(kubeconfig_text(cluster="insecure-skip-tls-verify: true\n"))
    assert allowing.put(f"{account}/computes/testcluster", json=insecure, headers=owner).status_code == 201


PATH = "/etc/mms/worker-client.key"


@pytest.mark.parametrize(
    ("tls", "field"),
    [
        ({"ca": CERT, "cert": CERT, "key": PATH}, "properties.tls.key"),
        ({"ca": CERT, "cert": CERT, "key": f"{PATH}\n-----BEGIN PRIVATE KEY-----"}, "properties.tls.key"),
        ({"ca": CERT, "cert": f"{PATH}\n{CERT}", "key": KEY}, "properties.tls.cert"),
        ({"ca": f"{CERT}{PATH}\n", "cert": CERT, "key": KEY}, "properties.tls.ca"),
        ({"ca": CERT.replace("MIIBfake", "MIIB /etc/ssl/ca.pem"), "cert": CERT, "key": KEY}, "properties.tls.ca"),
    ],
    ids=["a-path", "a-path-then-a-header", "a-path-before-the-pem", "a-path-after-the-pem", "a-path-inside"],
)
def test_swarm_tls_materials_must_be_inline_pem(
    client: TestClient, owner: dict[str, str], account: str, tls: dict[str, str], field: str
) -> None:
    body = {"type": "swarm", "properties": {"dockerHost": "tcp://swarm.example.com:2376", "tls": tls}}
    response = client.put(f"{account}/computes/files", json=body, headers=owner)
    assert response.status_code == 400, response.text
    assert any(d["message"].startswith(f"{field}:") for d in response.json()["details"]), response.json()
    assert "SECRET" not in response.text and PATH not in response.text


def test_swarm_tls_materials_may_hold_a_chain_and_an_encrypted_key(
    client: TestClient, owner: dict[str, str], account: str
) -> None:
    encrypted = (
        "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0A1B\n\n"
        "TOP-SECRET-KEY-MATERIAL\n-----END RSA PRIVATE KEY-----\n"
    )
    tls = {"ca": CERT + CERT, "cert": "\n" + CERT, "key": encrypted.replace("\n", "\r\n")}
    body = {"type": "swarm", "properties": {"dockerHost": "tcp://swarm.example.com:2376", "tls": tls}}
    assert client.put(f"{account}/computes/chain", json=body, headers=owner).status_code == 201


def test_a_bad_compute_name_is_a_400(client: TestClient, owner: dict[str, str], account: str) -> None:
    response = client.put(f"{account}/computes/-x", json=swarm(), headers=owner)
    assert response.status_code == 400 and "computeName" in response.json()["message"]


def test_readers_list_targets_but_only_contributors_attach_and_detach(
    client: TestClient, callers: Callers, owner: dict[str, str], account: str
) -> None:
    assert client.put(f"{account}/computes/myswarm", json=swarm(), headers=owner).status_code == 201
    reader = callers.headers("Reader")
    assert client.get(f"{account}/computes", headers=reader).status_code == 200
    assert client.put(f"{account}/computes/other", json=swarm(), headers=reader).status_code == 403
    assert client.delete(f"{account}/computes/myswarm", headers=reader).status_code == 403
    contributor = callers.headers("Contributor")
    assert client.put(f"{account}/computes/other", json=swarm(), headers=contributor).status_code == 201


@pytest.mark.parametrize(
    "host", ["tcp://127.0.0.1:2375", "tcp://169.254.169.254:2376", "tcp://10.0.0.1:2376", "tcp://[::1]:2376"]
)
def test_a_swarm_manager_at_a_non_public_address_is_refused(
    client: TestClient, owner: dict[str, str], account: str, host: str
) -> None:
    response = client.put(f"{account}/computes/inside", json=swarm(host), headers=owner)
    assert response.status_code == 400, response.text
    assert "properties.dockerHost" in response.json()["message"]


def test_an_operator_may_allow_a_private_swarm_manager(
    app_context: ServiceContext, db: Session, account: str, owner: dict[str, str]
) -> None:
    allowing = client_with(app_context, fetch_allow_hosts=["10.0.0.1:2376"])
    allowed = allowing.put(f"{account}/computes/inside", json=swarm("tcp://10.0.0.1:2376"), headers=owner)
    assert allowed.status_code == 201, allowed.text
    refused = allowing.put(f"{account}/computes/other", json=swarm("tcp://10.0.0.2:2376"), headers=owner)
    assert refused.status_code == 400 and "MMS_FETCH_ALLOW_HOSTS" in refused.json()["message"]


def test_an_address_the_operator_allows_for_one_compute_is_that_computes_alone(
    app_context: ServiceContext, db: Session, client: TestClient, owner: dict[str, str]
) -> None:
    """MMS_COMPUTE_ALLOW_HOSTS vouches for a private address as one compute's: that compute
    attaches there; the account's other compute, and another tenant's compute of the same
    names, are refused as for an address nobody listed; and nothing else of the tenant's (a
    model's URL) is fetched from it."""
    name = f"acct-{uuid.uuid4().hex[:8]}"
    mine = new_account(client, owner, subscription="sub-a", name=name)
    theirs = new_account(client, owner, subscription="sub-b", name=name)
    path = f"/subscriptions/SUB-A/resourceGroups/RG-1/accounts/{name.upper()}/computes/prod"  # any case
    allowing = client_with(app_context, compute_allow_hosts={path: ["10.0.0.1:2376"]})
    allowed = allowing.put(f"{mine}/computes/prod", json=swarm("tcp://10.0.0.1:2376"), headers=owner)
    assert allowed.status_code == 201, allowed.text
    for url in (f"{mine}/computes/staging", f"{mine}/computes/Prod", f"{theirs}/computes/prod"):
        refused = allowing.put(url, json=swarm("tcp://10.0.0.1:2376"), headers=owner)
        assert refused.status_code == 400, refused.text
        assert "MMS_COMPUTE_ALLOW_HOSTS" in refused.json()["message"]
    # Nor anything else of the tenant's: the policy the workers fetch models, assets and
    # webhooks with does not list it.
    with pytest.raises(FetchError, match="10.0.0.1"):
        check_url("https://10.0.0.1:2376/m.pkl", policy=fetch_policy(allowing.app.state.context.settings))


@pytest.mark.parametrize(
    "path",
    [
        "/subscriptions/s/resourceGroups/g/accounts/a",  # an account, no compute
        "/subscriptions/s/resourceGroups/g/accounts/a/computes/",
        "/subscriptions/s/resourcegroup/g/accounts/a/computes/c",
    ],
)
def test_a_compute_allow_list_keyed_by_anything_but_a_computes_path_is_refused_at_start(path: str) -> None:
    with pytest.raises(ValidationError, match="not a compute's path"):
        Settings(compute_allow_hosts={path: ["10.0.0.1"]})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/subscriptions/s/resourceGroups/g/accounts/a/computes/swarm1", "'a' is not an account name (2-64"),
        ("/subscriptions/s/resourceGroups/g/accounts/acct/computes/1st", "'1st' is not a compute name (2-32"),
        ("/subscriptions/s s/resourceGroups/g/accounts/acct/computes/c1", "'s s' is not a subscription name"),
        ("/subscriptions/s/resourceGroups/g?x/accounts/acct/computes/c1", "'g?x' is not a resource group name"),
        ("/subscriptions/s/resourceGroups/g/accounts/acct/computes/local", "the built-in local target"),
    ],
)
def test_a_compute_allow_list_key_that_no_compute_can_have_is_refused_at_start(path: str, message: str) -> None:
    """A misspelt key would never match, and say nothing: it is refused saying which part."""
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(compute_allow_hosts={path: ["10.0.0.1"]})


@pytest.mark.parametrize("host", ["https://10.0.0.1", "10.0.0.1/x", "user@10.0.0.1", "10.0.0.1:", "", "a b"])
def test_a_compute_allow_list_entry_that_is_not_host_or_host_port_is_refused_at_start(host: str) -> None:
    with pytest.raises(ValidationError, match="is not host or host:port"):
        Settings(compute_allow_hosts={"/subscriptions/s/resourceGroups/g/accounts/acct/computes/swarm1": [host]})


def test_a_compute_allow_list_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    path = "/subscriptions/S/resourceGroups/G/accounts/Acct/computes/Swarm"
    monkeypatch.setenv("MMS_COMPUTE_ALLOW_HOSTS", f'{{"{path}": ["10.0.0.1", "[fd00::1]:2376"]}}')
    settings = Settings()
    assert settings.compute_allow_hosts_for("/subscriptions/s/resourcegroups/g/accounts/acct/computes/Swarm") == {
        "10.0.0.1",
        "[fd00::1]:2376",
    }
    assert settings.compute_allow_hosts_for("/subscriptions/s/resourcegroups/g/accounts/acct/computes/swarm") == set()
    assert settings.compute_allow_hosts_for("/subscriptions/s/resourcegroups/g/accounts/acct/computes/other") == set()
    assert settings.compute_allow_hosts_for(None) == set()


def test_a_compute_allow_list_holds_each_address_in_its_one_written_form() -> None:
    path = "/subscriptions/s/resourceGroups/g/accounts/acct/computes/swarm1"
    settings = Settings(compute_allow_hosts={path: ["FD00:0::1", "[FD00:0::2]:2376", "[fd00::3]", "Swarm.Corp:2376"]})
    assert settings.compute_allow_hosts_for(path) == {"fd00::1", "[fd00::2]:2376", "[fd00::3]", "swarm.corp:2376"}


@pytest.mark.parametrize("entry", ["fd00::1", "[fd00::1]", "[FD00:0::1]:2376"])
def test_a_private_ipv6_swarm_manager_is_attached_as_any_form_of_its_entry_allows(
    app_context: ServiceContext, db: Session, client: TestClient, owner: dict[str, str], entry: str
) -> None:
    account = new_account(client, owner)
    path = f"{account.removeprefix('/api')}/computes/v6"
    allowing = client_with(app_context, compute_allow_hosts={path: [entry]})
    attached = allowing.put(f"{account}/computes/v6", json=swarm("tcp://[fd00::1]:2376"), headers=owner)
    assert attached.status_code == 201, attached.text


def test_settings_are_read_once_a_process() -> None:
    """`mms serve`, `mms gateway` and `mms worker` clear the cache after changing the environment."""
    get_settings.cache_clear()
    assert get_settings() is get_settings()


@pytest.mark.parametrize(
    "host",
    [
        "tcp://167772165:2376",
        "tcp://0x0ac80005:2376",
        "tcp://10.200.5:2376",
        "tcp://012.200.0.5:2376",
        "tcp://10.0.0.5.:2376",
    ],
)
def test_an_ipv4_address_written_other_than_as_a_dotted_quad_is_refused(
    client: TestClient, owner: dict[str, str], account: str, host: str
) -> None:
    """A resolver reads each as an address: taken for a name, it would pass here and be judged
    only when the worker connects."""
    response = client.put(f"{account}/computes/odd", json=swarm(host), headers=owner)
    assert response.status_code == 400, response.text
    assert "properties.dockerHost" in response.json()["message"] and "a.b.c.d" in response.json()["message"]


@pytest.mark.parametrize("host", ["tcp://10.213.4.5:2376", "tcp://[::ffff:10.213.4.5]:2376"])
def test_a_swarm_manager_in_the_operators_service_networks_is_refused_even_if_allowed(
    app_context: ServiceContext, db: Session, account: str, owner: dict[str, str], host: str
) -> None:
    """Where other services' replicas answer: the workers would refuse it at every pass, and the
    attach says so at once, whatever MMS_FETCH_ALLOW_HOSTS lists."""
    allowing = client_with(
        app_context, fetch_allow_hosts=["10.213.4.5", "::ffff:10.213.4.5"], service_subnet_pool="10.213.0.0/16"
    )
    refused = allowing.put(f"{account}/computes/pooled", json=swarm(host), headers=owner)
    assert refused.status_code == 400, refused.text
    assert "properties.dockerHost" in refused.json()["message"]
    assert "MMS_SERVICE_SUBNET_POOL" in refused.json()["message"]
    assert allowing.get(f"{account}/computes/pooled", headers=owner).status_code == 404


@pytest.mark.parametrize(
    "host",
    [
        "tcp://admin:hunter2@swarm.example.com:2376",
        "tcp://swarm.example.com:2376?token=hunter2",
        "tcp://h:2376#x",
        "tcp://h:0",
    ],
)
def test_a_docker_host_is_an_address_only_since_readers_see_it(
    client: TestClient, owner: dict[str, str], account: str, callers: Callers, host: str
) -> None:
    # dockerHost is answered to Readers: a login or token in it would be shown to them.
    response = client.put(f"{account}/computes/sw", json=swarm(host), headers=owner)
    assert response.status_code == 400, response.text
    assert "properties.dockerHost" in response.json()["message"]
    listed = client.get(f"{account}/computes", headers=callers.headers("Reader")).text
    assert "hunter2" not in listed


def with_operators_swarm(app_context: ServiceContext) -> TestClient:
    """A client of the same service and database with the operator's swarm set (MMS_SWARM_DOCKER_HOST)."""
    return client_with(app_context, swarm_docker_host="unix:///var/run/docker.sock")


def test_the_operators_swarm_is_a_built_in_target(
    client: TestClient, app_context: ServiceContext, owner: dict[str, str], account: str
) -> None:
    with_swarm = with_operators_swarm(app_context)
    listed = with_swarm.get(f"{account}/computes", headers=owner).json()["value"]
    assert [(c["name"], c["type"], c["builtIn"]) for c in listed] == [
        ("local", "local", True),
        ("swarm", "swarm", True),
    ]
    assert with_swarm.get(f"{account}/computes/SWARM", headers=owner).json()["name"] == "swarm"
    for response in (
        with_swarm.put(f"{account}/computes/swarm", json=swarm(), headers=owner),
        with_swarm.delete(f"{account}/computes/swarm", headers=owner),
    ):
        assert (response.status_code, response.json()["code"]) == (409, "BuiltInCompute")
    # Without the setting, `swarm` is a name like any other.
    assert client.put(f"{account}/computes/swarm", json=swarm(), headers=owner).status_code == 201
