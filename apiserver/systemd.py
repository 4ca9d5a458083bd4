"""A tiny sd_notify client: tell systemd (Type=notify) when the service is ready or stopping.

The protocol is one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to the
socket named by ``$NOTIFY_SOCKET``; a leading ``@`` names a socket in the abstract namespace.
No systemd library is needed for that.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


def notify_address(env: Mapping[str, str] | None = None) -> str | None:
    """The socket address to notify, or None when not started by a notify-aware manager."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    return value


def notify(*states: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``f"MAINPID={pid}"``) as one datagram.

    Returns whether a message was sent. A manager that went away is logged, never raised:
    the service must keep serving even if its supervisor cannot be told about it.
    """
    address = notify_address(env)
    if address is None:
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as e:
        logger.warning("sd_notify to %r failed: %s", address.replace("\0", "@"), e)
        return False
    return True
