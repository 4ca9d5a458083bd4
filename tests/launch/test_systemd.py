"""systemd integration: sd_notify datagrams, the watchdog interval, and the shipped unit file."""

from __future__ import annotations

import os
import shlex
import socket
import threading
import uuid
from pathlib import Path

import pytest

from apiserver.launch import cli, systemd
from apiserver.launch.systemd import notify, watchdog_interval


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_sends_one_datagram(tmp_path: Path, abstract: bool) -> None:
    name = f"@fanin-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name[1:] if abstract else name)
        assert notify("READY=1", "STATUS=ok", env={"NOTIFY_SOCKET": name})
        assert manager.recv(4096) == b"READY=1\nSTATUS=ok"
    assert not notify("READY=1", env={})
    assert not notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})


def test_notify_gives_up_on_a_manager_that_stopped_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(systemd, "SEND_TIMEOUT_S", 0.1)
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    sent: list[bool] = []

    def ping() -> None:
        # Until the unread queue is full and three sends in a row have given up: each one
        # past that point costs the whole SEND_TIMEOUT_S, so pinging on (it once sent 100)
        # only spent seconds proving the same thing again.
        for _ in range(1000):
            sent.append(notify("WATCHDOG=1", env=env))
            if sent[-3:] == [False] * 3:
                return

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(env["NOTIFY_SOCKET"])
        # The launcher's loop pings the watchdog: a full queue must not hang it.
        pinger = threading.Thread(target=ping, daemon=True)
        pinger.start()
        pinger.join(30)
        assert not pinger.is_alive()
    assert sent[0] and sent[-3:] == [False] * 3


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_systemd_unit_runs_a_valid_command_and_outwaits_the_drain() -> None:
    unit_path = Path(__file__).parents[2] / "deploy" / "fanin.service"
    unit: dict[str, str] = {}
    for line in unit_path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            unit[key.strip()] = value.strip()
    assert unit["Type"] == "notify" and unit["KillMode"] == "mixed"
    assert unit["Restart"] == "on-failure"
    argv = shlex.split(unit["ExecStart"])
    assert Path(argv[0]).name == "fanin"
    args = cli.build_parser().parse_args(argv[1:])
    server, _ = cli.configs_from_args(args, env={})
    assert server.host == "0.0.0.0"
    assert float(unit["TimeoutStopSec"]) > server.shutdown_timeout
    assert float(unit["TimeoutStartSec"]) >= server.engine_ready_timeout
