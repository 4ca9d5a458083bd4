"""The one listening socket every API server accepts on, bound by the launcher before anything
else so that a port in use is reported at once instead of after a model load."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from apiserver.config import ServerConfig

#: Same as vLLM/uvicorn's default: connections the kernel queues while all servers are busy.
BACKLOG = 2048


class LaunchError(RuntimeError):
    """`fanin serve` cannot start; the message says why, for a human."""


def bind_listener(cfg: ServerConfig) -> socket.socket:
    """A listening socket on ``cfg.uds`` or ``cfg.host:cfg.port``, inheritable by children
    through ``pass_fds``."""
    sock = _bind_uds(cfg.uds) if cfg.uds else _bind_tcp(cfg.host, cfg.port)
    sock.listen(BACKLOG)
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise LaunchError(f"cannot listen on {where}: unknown host ({e.strerror})") from e
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LaunchError(
                f"cannot listen on {where}: address already in use "
                "(another server on that port? pick another with --port)"
            ) from e
        raise LaunchError(f"cannot listen on {where}: {e.strerror or e}") from e
    return sock


def _bind_uds(path: str) -> socket.socket:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise LaunchError(f"cannot listen on unix socket {path}: {e.strerror or e}") from e
    return sock


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a previous run; refuse to touch a live socket or a file
    that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LaunchError(f"--uds {path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError as e:
            raise LaunchError(f"--uds {path}: cannot check the existing socket: {e}") from e
    raise LaunchError(f"--uds {path} is in use by a running server")


def remove_uds(cfg: ServerConfig) -> None:
    """Remove our socket file on exit (no-op for TCP)."""
    if cfg.uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(cfg.uds)


def describe_listener(sock: socket.socket, cfg: ServerConfig) -> str:
    """Where clients connect, with the real port when ``--port 0`` was asked for."""
    if cfg.uds:
        return f"unix:{cfg.uds}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
