"""The kubeconfig policy (app/deployments/kubeconfig.py) the API applies when a kubernetes
target is attached and the worker before it connects: data only, an allow-list of fields in
every entry, https servers, errors naming the field and never a credential. Where a server's
address leads is the caller's hook (the worker's: tests/workers/deploy/test_kubernetes_objects.py)."""

from __future__ import annotations

import time

import pytest

from app.deployments.kubeconfig import MAX_DEPTH, WHOLE_FILE, KubeconfigRefused, check_kubeconfig
from tests.factories import KUBE_CA, KUBE_SERVER, KUBE_TOKEN, kubeconfig_text


def _refused(text: str, **options: object) -> KubeconfigRefused:
    with pytest.raises(KubeconfigRefused) as raised:
        check_kubeconfig(text, **options)  # type: ignore[arg-type]
    assert KUBE_TOKEN not in str(raised.value)
    assert str(raised.value) == f"kubeconfig {raised.value.field}: {raised.value.reason}"
    return raised.value


def test_a_kubeconfig_with_inline_credentials_is_accepted() -> None:
    checked = check_kubeconfig(kubeconfig_text())
    assert checked.server == KUBE_SERVER
    assert checked.namespace == "tenant-a"
    assert checked.token == KUBE_TOKEN
    assert checked.certificate_authority_data == KUBE_CA
    assert checked.insecure_skip_tls_verify is False
    assert KUBE_TOKEN not in repr(checked)


@pytest.mark.parametrize(
    ("cluster", "user", "field", "reason"),
    [
        ("", "exec:\n  command: /bin/sh\n  apiVersion: x\n", "users[0].user.exec", "runs a command on the worker"),
        ("", "auth-provider:\n  name: gcp\n  config: {cmd-path: /usr/bin/gcloud}\n", "users[0].user.auth-provider", ""),
        ("", "tokenFile: /var/run/secrets/token\n", "users[0].user.tokenFile", "reads a file on the worker"),
        ("", "client-certificate: /etc/ssl/private/worker.pem\n", "users[0].user.client-certificate", "reads a file"),
        ("", "client-key: /var/lib/mms/secret.key\n", "users[0].user.client-key", "reads a file"),
        ("certificate-authority: /etc/passwd\n", "", "clusters[0].cluster.certificate-authority", "reads a file"),
        ("proxy-url: http://10.0.0.1:3128\n", "", "clusters[0].cluster.proxy-url", "through another host"),
        ("", "credential-helper: run-me\n", "users[0].user.credential-helper", "not a field this service accepts"),
    ],
    ids=["exec", "auth-provider", "tokenFile", "client-certificate", "client-key", "certificate-authority",
         "proxy-url", "unknown-field"],
)  # fmt: skip
def test_a_field_that_runs_commands_reads_files_or_is_unknown_is_refused(
    cluster: str, user: str, field: str, reason: str
) -> None:
    error = _refused(kubeconfig_text(cluster=cluster, user=user))
    assert error.field == field
    assert reason in error.reason


def test_insecure_skip_tls_verify_is_refused_unless_allowed() -> None:
    text = kubeconfig_text(cluster="insecure-skip-tls-verify: true\n")
    error = _refused(text)
    assert error.field == "clusters[0].cluster.insecure-skip-tls-verify"
    assert "MMS_KUBERNETES_ALLOW_INSECURE_TLS" in error.reason
    assert check_kubeconfig(text, allow_insecure_tls=True).insecure_skip_tls_verify is True


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ("http://20.43.0.10:8080", "must be an https:// URL"),
        ("http://admin:hunter2@20.43.0.10:8080", "must be an https:// URL"),
        ("https://", "has no host"),
        ("https://20.43.0.10:99999", "is not a valid URL"),
    ],
)
def test_a_server_that_is_not_an_https_url_with_a_host_is_refused(server: str, reason: str) -> None:
    error = _refused(kubeconfig_text(server=server))
    assert (error.field, error.reason) == ("clusters[0].cluster.server", reason)
    assert "hunter2" not in str(error)


def test_without_a_hook_addresses_are_not_judged() -> None:
    """The API's case: the worker judges the address when it connects."""
    assert check_kubeconfig(kubeconfig_text(server="https://10.0.0.1:6443")).server == "https://10.0.0.1:6443"


def test_the_hook_sees_every_server_and_its_refusal_names_the_field() -> None:
    text = kubeconfig_text().replace(
        "users:", "- name: other\n  cluster:\n    server: https://10.0.0.1:6443\nusers:"
    )  # a second cluster no context uses: checked all the same
    seen: list[tuple[str, str]] = []

    def check_server(url: str, field: str) -> None:
        seen.append((url, field))
        if url.startswith("https://10."):
            raise KubeconfigRefused(field, "is at a private address")

    error = _refused(text, check_server=check_server)
    assert error.field == "clusters[1].cluster.server"
    assert seen == [
        (KUBE_SERVER, "clusters[0].cluster.server"),
        ("https://10.0.0.1:6443", "clusters[1].cluster.server"),
    ]


def test_a_hostile_entry_outside_the_current_context_is_refused_too() -> None:
    text = kubeconfig_text().replace(
        "contexts:",
        "- name: other\n  user:\n    exec: {command: /bin/sh, apiVersion: x}\ncontexts:",
    )
    assert _refused(text).field == "users[1].user.exec"


def test_a_current_context_that_names_nothing_is_refused() -> None:
    error = _refused(kubeconfig_text().replace("current-context: prod", "current-context: staging"))
    assert error.field == "current-context"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("- just\n- a list\n", WHOLE_FILE),
        ("clusters: [\n", WHOLE_FILE),
        ("x" * (300 * 1024), WHOLE_FILE),
        ("users: []\n", "current-context"),
        ("kind: Pod\n", "kind"),
        ("kind: Config\nx: \ud800\n", WHOLE_FILE),
        ("kind: Config\nx: \x00\n", WHOLE_FILE),
        ("{[a]: b}\n", WHOLE_FILE),
        ("clusters:\n- name: c\n  cluster: {server: [https://x]}\n", "clusters[0].cluster.server"),
    ],
)
def test_a_document_that_is_not_a_kubeconfig_is_refused(text: str, field: str) -> None:
    assert _refused(text).field == field


@pytest.mark.parametrize(
    "where",
    [
        "extensions",  # an allowed field the policy does not walk: accepted, and still cheap
        "clusters",  # a field the policy walks: refused at its first entry
        "users",
    ],
)
def test_a_yaml_alias_bomb_costs_nothing(where: str) -> None:
    anchors = ", ".join(
        ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
        + [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 9)]
    )
    # Nine levels of nine aliases: 9**9 (387 million) strings if expanded, under 1 KB as written.
    bomb = f"preferences: {{{anchors}}}\n{where}: *l8\n"
    text = kubeconfig_text() + bomb if where == "extensions" else f"apiVersion: v1\nkind: Config\n{bomb}"
    started = time.monotonic()
    if where == "extensions":
        assert check_kubeconfig(text).token == KUBE_TOKEN
    else:
        assert _refused(text).field == f"{where}[0]"
    assert time.monotonic() - started < 1.0


def test_a_deeply_nested_document_is_refused_not_a_recursion_error() -> None:
    depth = 5000
    error = _refused("extensions: " + "[" * depth + "]" * depth + "\n")
    assert error.field == WHOLE_FILE
    assert f"nests deeper than {MAX_DEPTH} levels" in error.reason
    # A kubeconfig's own depth (and some extensions) stays well inside the bound.
    nested = "extensions: " + "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2) + "\n"
    assert check_kubeconfig(kubeconfig_text() + nested).server == KUBE_SERVER
