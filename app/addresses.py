"""Whether an address is one the service may be sent to on a tenant's word: globally routable,
not the host's loopback, a private network, a link-local (metadata) address or any other
special-purpose range; and whether it is in the operator's service networks. One judgement for
the API (a swarm manager's address) and the workers (every address a URL resolves to, a
swarm manager's when they connect)."""

from __future__ import annotations

import ipaddress

__all__ = ["in_service_pool", "is_public_address"]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IETF protocol assignments: Python counts a few of them global (192.0.0.9 and .10, anycast,
# and 192.0.0.192, which one cloud answers its instance metadata at): none is a tenant's host.
_PROTOCOL_ASSIGNMENTS = ipaddress.ip_network("192.0.0.0/24")


def is_public_address(address: str) -> bool:
    """True if ``address`` is globally routable (IPv6 forms embedding IPv4 judged by the IPv4)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop any "%scope"
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:  # tunnel endpoints we cannot vet
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    # is_global alone differs between Python patch releases (e.g. multicast, fec0::/10),
    # so also refuse every special-purpose flag explicitly.
    special = (
        ip.is_private
        or ip.is_reserved
        or ip.is_multicast
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or getattr(ip, "is_site_local", False)
        or ip in _PROTOCOL_ASSIGNMENTS
    )
    return ip.is_global and not special


def in_service_pool(address: str, pool: str) -> bool:
    """Is ``address`` (IPv6 forms that embed an IPv4 address judged by it) in ``pool``
    (MMS_SERVICE_SUBNET_POOL), where the operator's services' replicas answer?"""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None:
            return False
        ip = embedded
    return ip in ipaddress.IPv4Network(pool)
