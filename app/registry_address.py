"""One registry, however a reference spells its address."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["is_loopback_name", "registry_endpoint"]


def registry_endpoint(host: str) -> tuple[str, int]:
    """``host[:port]`` as (lower-case name without a trailing dot, port): the port the
    registry clients use when none is given (443, or 80 on loopback, spoken to over plain
    HTTP) filled in, so ``Registry.Example:443`` and ``registry.example`` compare equal."""
    try:
        parts = urlsplit(f"//{host.strip()}")
        name, port = (parts.hostname or "").rstrip("."), parts.port
    except ValueError:  # a port that is not a number: compare the text as it is
        return host.strip().lower(), 0
    if port is None:
        port = 80 if is_loopback_name(name) else 443
    return name, port


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback IP address (a registry there is spoken to over plain HTTP)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
