"""The policy a tenant's kubeconfig must pass (docs/design/web-services.md, section 4): one
policy, used by the API when a kubernetes target is attached and by the worker before it connects.

A kubeconfig is a program as much as a file: ``exec`` and ``auth-provider`` run commands on
whoever loads it, ``client-certificate``, ``client-key``, ``certificate-authority`` and
``tokenFile`` read that machine's files, ``proxy-url`` sends its traffic elsewhere, and its
``server`` may name an address inside the operator's network. The worker is that machine, so a
tenant's kubeconfig is parsed here as data (never by the client's own loader), every entry is
checked whether or not its context is the current one, and only inline credentials pass
(``token``, ``client-certificate-data``, ``client-key-data``, ``certificate-authority-data``,
``username``/``password``). Servers are ``https://`` only, and ``insecure-skip-tls-verify`` passes
only when ``MMS_KUBERNETES_ALLOW_INSECURE_TLS`` is set.

Where a server's address may lead is not judged here: that needs the fetcher's address rules and
a name resolved when the connection is made, so the caller passes it as ``check_server`` (the
worker does: workers/deploy/kubeconfig.py). Errors name the field (``users[0].user.exec``) and
never hold a credential's value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

__all__ = [
    "WHOLE_FILE",
    "CheckServer",
    "CheckedKubeconfig",
    "KubeconfigRefused",
    "check_kubeconfig",
]

MAX_KUBECONFIG_BYTES = 256 * 1024
# A kubeconfig nests about five levels; its extensions may add a few. PyYAML composes nodes
# recursively, so a document of nested brackets would otherwise end in a RecursionError.
MAX_DEPTH = 32
WHOLE_FILE = "(file)"  # the field of an error about the document as a whole
_NAMESPACE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# What each entry may hold. Anything else is refused rather than ignored: a key this code does
# not know is one it cannot vouch for (the client may act on it).
_CLUSTER_KEYS = frozenset(
    {"server", "certificate-authority-data", "insecure-skip-tls-verify", "tls-server-name", "extensions"}
)
_USER_KEYS = frozenset({"token", "client-certificate-data", "client-key-data", "username", "password", "extensions"})
_CONTEXT_KEYS = frozenset({"cluster", "user", "namespace", "extensions"})
_TOP_KEYS = frozenset(
    {"apiVersion", "kind", "clusters", "users", "contexts", "current-context", "preferences", "extensions"}
)
# Why the known hostile keys are refused, for an error a tenant can act on.
_REFUSED = {
    "exec": "runs a command on the worker",
    "auth-provider": "runs a credential plugin on the worker",
    "tokenFile": "reads a file on the worker",
    "client-certificate": "reads a file on the worker",
    "client-key": "reads a file on the worker",
    "certificate-authority": "reads a file on the worker",
    "proxy-url": "sends the connection through another host",
    "disable-compression": "is not supported",
}
_INLINE_HINT = (
    "; only inline credentials are accepted (token, client-certificate-data, client-key-data, "
    "certificate-authority-data, username/password)"
)

CheckServer = Callable[[str, str], None]
"""``check_server(url, field)``: raises ``KubeconfigRefused`` (naming ``field``) if ``url`` may not be reached."""


class KubeconfigRefused(ValueError):
    """The kubeconfig breaks the policy; ``field`` is the path of the entry at fault, ``reason`` why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"kubeconfig {field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class CheckedKubeconfig:
    """The current context's cluster and credentials, checked; what the target connects with."""

    server: str
    namespace: str
    certificate_authority_data: str | None = None
    tls_server_name: str | None = None
    insecure_skip_tls_verify: bool = False
    token: str | None = field(default=None, repr=False)
    client_certificate_data: str | None = field(default=None, repr=False)
    client_key_data: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects) with a bound on nesting."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise KubeconfigRefused(WHOLE_FILE, f"nests deeper than {MAX_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def check_kubeconfig(
    text: str | bytes, *, allow_insecure_tls: bool = False, check_server: CheckServer | None = None
) -> CheckedKubeconfig:
    """Parse ``text`` as data and refuse it unless every entry passes the policy.

    ``check_server(url, field)`` is called for each cluster's server once its form has passed;
    without it, addresses are not judged (the caller must do so before connecting).
    """
    try:
        raw = text.encode() if isinstance(text, str) else text
    except UnicodeEncodeError:  # a lone surrogate
        raise KubeconfigRefused(WHOLE_FILE, "is not valid UTF-8 text") from None
    if len(raw) > MAX_KUBECONFIG_BYTES:
        raise KubeconfigRefused(WHOLE_FILE, f"is larger than {MAX_KUBECONFIG_BYTES // 1024} KiB")
    try:
        # Aliases stay references to one object, and only the known structure below is walked
        # (never a whole tree), so a "billion laughs" document costs nothing.
        document = yaml.load(raw, Loader=_Loader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KubeconfigRefused(WHOLE_FILE, f"is not valid YAML{where}") from None
    config = _mapping(document, WHOLE_FILE)
    _only_known(config, _TOP_KEYS, "")
    if config.get("kind", "Config") != "Config":
        raise KubeconfigRefused("kind", "must be Config")

    clusters = {name: entry for name, entry in _entries(config, "clusters", "cluster")}
    users = {name: entry for name, entry in _entries(config, "users", "user")}
    contexts = {name: entry for name, entry in _entries(config, "contexts", "context")}
    for path, cluster in clusters.values():
        _check_cluster(cluster, path, allow_insecure_tls, check_server)
    for path, user in users.values():
        _check_user(user, path)
    for path, context in contexts.values():
        _check_context(context, path, clusters, users)

    current = config.get("current-context")
    if not isinstance(current, str) or not current:
        raise KubeconfigRefused("current-context", "is missing: name the context to use")
    if current not in contexts:
        raise KubeconfigRefused("current-context", f"names no context: {current!r}")
    _, context = contexts[current]
    _, cluster = clusters[context["cluster"]]
    user: Mapping[str, Any] = users[context["user"]][1] if context.get("user") else {}
    return CheckedKubeconfig(
        server=cluster["server"],
        namespace=context.get("namespace") or "default",
        certificate_authority_data=cluster.get("certificate-authority-data"),
        tls_server_name=cluster.get("tls-server-name"),
        insecure_skip_tls_verify=bool(cluster.get("insecure-skip-tls-verify")),
        token=user.get("token"),
        client_certificate_data=user.get("client-certificate-data"),
        client_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
    )


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise KubeconfigRefused(path, "must be a mapping")
    return value


def _only_known(entry: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    for key in entry:
        where = f"{path}.{key}" if path else str(key)
        if key in _REFUSED:
            hint = _INLINE_HINT if _REFUSED[key].startswith(("runs", "reads")) else ""
            raise KubeconfigRefused(where, f"{_REFUSED[key]}{hint}")
        if key not in allowed:
            raise KubeconfigRefused(where, "is not a field this service accepts")


def _entries(config: Mapping[str, Any], section: str, inner: str) -> list[tuple[str, tuple[str, Mapping[str, Any]]]]:
    """``(name, (path, body))`` of each entry of a named list such as ``clusters``."""
    raw = config.get(section) or []
    if not isinstance(raw, list):
        raise KubeconfigRefused(section, "must be a list")
    found: list[tuple[str, tuple[str, Mapping[str, Any]]]] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        path = f"{section}[{index}]"
        item = _mapping(item, path)
        _only_known(item, frozenset({"name", inner}), path)
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise KubeconfigRefused(f"{path}.name", "is missing")
        if name in seen:
            raise KubeconfigRefused(f"{path}.name", f"{name!r} is given twice")
        seen.add(name)
        found.append((name, (f"{path}.{inner}", _mapping(item.get(inner), f"{path}.{inner}"))))
    return found


def _check_cluster(
    cluster: Mapping[str, Any], path: str, allow_insecure_tls: bool, check_server: CheckServer | None
) -> None:
    _only_known(cluster, _CLUSTER_KEYS, path)
    _strings(cluster, path, ("server", "certificate-authority-data", "tls-server-name"))
    insecure = cluster.get("insecure-skip-tls-verify", False)
    if not isinstance(insecure, bool):
        raise KubeconfigRefused(f"{path}.insecure-skip-tls-verify", "must be true or false")
    if insecure and not allow_insecure_tls:
        raise KubeconfigRefused(
            f"{path}.insecure-skip-tls-verify",
            "turns off the check of the cluster's certificate; give certificate-authority-data instead "
            "(the operator may allow it with MMS_KUBERNETES_ALLOW_INSECURE_TLS)",
        )
    server = cluster.get("server")
    where = f"{path}.server"
    if not server:
        raise KubeconfigRefused(where, "is missing")
    if not server.lower().startswith("https://"):
        # Plain http would send the token in the clear. The URL is not echoed: it may hold a password.
        raise KubeconfigRefused(where, "must be an https:// URL")
    try:
        parts = urlsplit(server)
        host, _ = parts.hostname, parts.port  # .port raises ValueError when not a number or out of range
    except ValueError:
        raise KubeconfigRefused(where, "is not a valid URL") from None
    if not host:
        raise KubeconfigRefused(where, "has no host")
    if check_server is not None:
        check_server(server, where)


def _check_user(user: Mapping[str, Any], path: str) -> None:
    _only_known(user, _USER_KEYS, path)
    _strings(user, path, ("token", "client-certificate-data", "client-key-data", "username", "password"))
    if bool(user.get("client-certificate-data")) != bool(user.get("client-key-data")):
        raise KubeconfigRefused(f"{path}.client-key-data", "client-certificate-data and client-key-data go together")


def _check_context(
    context: Mapping[str, Any],
    path: str,
    clusters: Mapping[str, object],
    users: Mapping[str, object],
) -> None:
    _only_known(context, _CONTEXT_KEYS, path)
    _strings(context, path, ("cluster", "user", "namespace"))
    if context.get("cluster") not in clusters:
        raise KubeconfigRefused(f"{path}.cluster", "names no cluster of this kubeconfig")
    if context.get("user") and context["user"] not in users:
        raise KubeconfigRefused(f"{path}.user", "names no user of this kubeconfig")
    namespace = context.get("namespace")
    if namespace and not _NAMESPACE.fullmatch(namespace):
        raise KubeconfigRefused(f"{path}.namespace", "must be a DNS label (lower-case letters, digits, '-')")


def _strings(entry: Mapping[str, Any], path: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            raise KubeconfigRefused(f"{path}.{key}", "must be a string")
