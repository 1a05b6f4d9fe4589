"""Host names: the host part of a Host header, and whether a name or address is loopback.

Its own module, with nothing heavier than ``ipaddress``: ``edgerun serve`` checks ``--host`` before its
bundles start loading, and the request guard checks every Host header with the same two functions.
"""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: bytes | str | None) -> str:
    """The host part of a Host header, lower-case, without port or IPv6 brackets."""
    value = (header.decode("latin-1") if isinstance(header, bytes) else header or "").strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
