"""A tiny sd_notify client: tell systemd (Type=notify) when the service is ready or stopping,
and keep its watchdog (WatchdogSec=) fed.

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

#: Longest wait for room in the manager's queue (systemd drains it at once unless stuck).
SEND_TIMEOUT_S = 1.0


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
    the service must keep serving even if its supervisor cannot be told about it. Nor does it
    wait long for one that stopped reading (its datagram queue is full): the launcher's loop
    sends these, and would otherwise hang in ``send`` with no way out.
    """
    address = notify_address(env)
    if address is None:
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall(payload)
    except OSError as e:
        logger.warning("sd_notify to %r failed: %s", address.replace("\0", "@"), e)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings when the manager asked for them (``WatchdogSec=``
    sets ``WATCHDOG_USEC``): half the timeout, as sd_watchdog_enabled(3) advises. None when
    not asked, or asked of another process (``WATCHDOG_PID``)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
