"""Which Host headers a server bound to loopback answers: the daemon's API and the model port both
refuse others (a web page that rebinds its own name to 127.0.0.1 sends its own name as Host)."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def host_name(host_header: str | None) -> str | None:
    """"localhost:8700" -> "localhost", "[::1]:8700" -> "::1"; None when malformed."""
    try:
        return urlsplit(f"//{host_header}").hostname if host_header else None
    except ValueError:
        return None
