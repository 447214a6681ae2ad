"""What the command-line client remembers between runs: where the service is, who signs in,
the current account, and a cached access token.

The environment can override it: ``MMS_SERVER`` (the service) and ``MMS_TOKEN`` (a token used
as given); this module is the one place the client reads them.

Everything lives in one folder (``MMS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/mms``, else
``~/.config/mms``): ``profile.json`` (service URL, subscription, resource group, account,
sign-in method; no secrets) and ``credentials.json`` (the service principal's secret and the
cached token). Both are written owner-only (0600, the folder 0700) by an atomic rename, so
another user never reads a secret and a crash never leaves half a file.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_SUBSCRIPTION = "default"
TOKEN_ENV = "MMS_TOKEN"
SERVER_ENV = "MMS_SERVER"


class ProfileError(Exception):
    """The profile cannot be used as it is; str() says what to run."""


def _loopback(host: str) -> bool:
    if host == "localhost":  # not "*.localhost": such a name may be resolved by DNS
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_url(value: str) -> str:
    """The service's URL from what the user gave: a URL, or a bare ``host[:port]`` (http on
    loopback, where `mms serve` runs without TLS; https elsewhere); ValueError if neither."""
    text = value.strip().rstrip("/")
    if text and "://" not in text:
        host = urlsplit(f"//{text}").hostname or ""
        text = f"{'http' if _loopback(host) else 'https'}://{text}"
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        parts = parts._replace(netloc="")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or any(ch.isspace() for ch in text)
    ):
        raise ValueError(f"{value!r} is not a service URL: give one such as http://127.0.0.1:8000, or a host:port")
    return text


def env_server() -> str | None:
    """The service named by ``MMS_SERVER``, if set."""
    value = os.environ.get(SERVER_ENV)
    if not value:
        return None
    try:
        return server_url(value)
    except ValueError as exc:
        raise ProfileError(f"{SERVER_ENV}: {exc}") from None


def env_token() -> str | None:
    """The token given in ``MMS_TOKEN``, if set."""
    return os.environ.get(TOKEN_ENV) or None


def config_dir() -> Path:
    explicit = os.environ.get("MMS_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mms"


@dataclass
class Profile:
    """The current context, as ``mms login``, ``account set`` and ``env set`` leave it."""

    server: str | None = None
    subscription: str = DEFAULT_SUBSCRIPTION
    resource_group: str | None = None
    account: str | None = None
    client_id: str | None = None
    # The token endpoint: None means the service's own /oauth2/token; else an external
    # authority's (an OAuth 2.0 client-credentials endpoint), with the scope to ask for.
    authority: str | None = None
    scope: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def account_path(self) -> str:
        """``/api/subscriptions/{s}/resourceGroups/{g}/accounts/{a}`` of the current account."""
        if not self.resource_group or not self.account:
            raise ProfileError(
                "no account is set: run `mms account modelmanagement set -n <account> "
                "-g <resource group>` (or create one with `... create`)"
            )
        return f"{self.group_path()}/accounts/{self.account}"

    def group_path(self, resource_group: str | None = None) -> str:
        group = resource_group or self.resource_group
        if not group:
            raise ProfileError(
                "no resource group is set: pass -g <resource group> or run `mms env set -g <resource group>`"
            )
        return f"/api/subscriptions/{self.subscription}/resourceGroups/{group}"


@dataclass
class Credentials:
    client_secret: str | None = None
    access_token: str | None = None
    expires_at: float | None = None  # epoch seconds


class ConfigStore:
    """Reads and writes the profile and the credentials in ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or config_dir()

    @property
    def profile_path(self) -> Path:
        return self.root / "profile.json"

    @property
    def credentials_path(self) -> Path:
        return self.root / "credentials.json"

    def load_profile(self) -> Profile:
        data = self._read(self.profile_path)
        known = {k: v for k, v in data.items() if k in Profile.__dataclass_fields__}
        return Profile(**known)

    def save_profile(self, profile: Profile) -> None:
        self._write(self.profile_path, asdict(profile))

    def load_credentials(self) -> Credentials:
        data = self._read(self.credentials_path)
        return Credentials(**{k: v for k, v in data.items() if k in Credentials.__dataclass_fields__})

    def save_credentials(self, credentials: Credentials) -> None:
        self._write(self.credentials_path, asdict(credentials))

    def clear(self) -> None:
        for path in (self.credentials_path, self.profile_path):
            path.unlink(missing_ok=True)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ProfileError(f"{path} cannot be read ({exc}); remove it and run `mms login` again") from None
        return data if isinstance(data, dict) else {}

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class MemoryStore(ConfigStore):
    """A profile and credentials held in memory, never written: a program's explicit workspace
    (the SDK's ``Workspace(...)``), which must neither read nor change the CLI's sign-in."""

    def __init__(self, profile: Profile, credentials: Credentials) -> None:
        super().__init__(Path("<memory>"))
        self._profile, self._credentials = profile, credentials

    def load_profile(self) -> Profile:
        return self._profile

    def save_profile(self, profile: Profile) -> None:
        self._profile = profile

    def load_credentials(self) -> Credentials:
        return self._credentials

    def save_credentials(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def clear(self) -> None:
        self._credentials = Credentials()
