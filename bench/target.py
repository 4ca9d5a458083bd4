"""The server under test: its URL, parsed and checked to be on this machine.

A load generator pointed at the wrong host is a denial-of-service tool, so only loopback
targets are accepted unless the user says ``--allow-remote``. The check never resolves a
name (a DNS query is itself traffic): an IP literal must be loopback (127.0.0.0/8, ::1, or
IPv4-mapped 127.x), and the only name accepted is ``localhost``, which is mapped to 127.0.0.1
without asking any resolver.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass


class TargetError(ValueError):
    """The URL is malformed or not allowed."""


@dataclass(frozen=True)
class Target:
    """Where requests go. ``connect_host`` is what the socket connects to; ``host`` is what
    the URL said (for the Host header and TLS)."""

    scheme: str
    host: str
    connect_host: str
    port: int
    base_path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host_header}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) is this machine, without resolving."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def parse_target(url: str, allow_remote: bool = False) -> Target:
    """Parse ``url`` (``http(s)://host[:port][/prefix]``); raises ``TargetError`` for a host
    that is not loopback unless ``allow_remote``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TargetError(f"{url!r}: the URL must start with http:// or https://")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise TargetError(f"{url!r}: {e}") from None
    if not host:
        raise TargetError(f"{url!r}: no host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise TargetError(f"{url!r}: give only scheme, host, port and a path prefix")
    loopback = is_loopback_host(host)
    if not loopback and not allow_remote:
        raise TargetError(
            f"{url!r}: {host} is not this machine (loopback: 127.0.0.0/8, ::1, localhost); "
            "the bench sends load only to this machine unless given --allow-remote"
        )
    is_localhost_name = host.lower().rstrip(".") == "localhost"
    return Target(
        scheme=parts.scheme,
        host=host,
        connect_host="127.0.0.1" if is_localhost_name else host,
        port=port or (443 if parts.scheme == "https" else 80),
        base_path=parts.path.rstrip("/"),
    )
