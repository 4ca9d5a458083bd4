"""The launcher's listening socket: a port in use is a clear error; a stale Unix socket file is
replaced, a live socket or a plain file is not."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from apiserver.config import ServerConfig
from apiserver.launch.listener import LaunchError, bind_listener


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError, match="already in use"):
            bind_listener(ServerConfig(host="127.0.0.1", port=port))


def test_uds_stale_file_is_replaced_but_live_socket_and_plain_file_are_not(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "api.sock")
    first = bind_listener(ServerConfig(uds=path))
    with pytest.raises(LaunchError, match="in use"):
        bind_listener(ServerConfig(uds=path))
    first.close()  # the file stays behind, as after a crash
    second = bind_listener(ServerConfig(uds=path))
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
    second.close()
    plain = tmp_path / "plain"
    plain.write_text("data", encoding="utf-8")
    with pytest.raises(LaunchError, match="not a socket"):
        bind_listener(ServerConfig(uds=str(plain)))
    assert plain.read_text(encoding="utf-8") == "data"
