"""The ``fanin`` command line and the launcher's building blocks (listening socket, sd_notify,
process events), in-process. The launcher itself is tested end to end in tests/integration."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest

from apiserver import cli, systemd
from apiserver.config import ServerConfig
from apiserver.listener import LaunchError, bind_listener
from apiserver.supervisor import MAX_RESPAWN_DELAY_S, Events, respawn_delay, spawn
from apiserver.systemd import notify, watchdog_interval

VLLM_FLAGS = {
    "--host", "--port", "--uds", "--api-key", "--served-model-name", "--max-model-len",
    "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization", "--dtype",
    "--allowed-media-domains", "--allowed-local-media-path", "--shutdown-timeout",
    "--renderer-num-workers", "--api-server-count",
}  # fmt: skip


def _configs(*argv: str, env: dict[str, str] | None = None) -> tuple[object, object]:
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli.configs_from_args(args, model="/models/m", env=env or {})


def test_serve_has_vllm_flags_and_none_for_launcher_fields() -> None:
    flags = {option.flag for option in cli.serve_options()}
    assert flags >= VLLM_FLAGS
    assert not flags & {"--engine-address", "--metrics-dir", "--model"}


def test_flag_values_reach_both_configs() -> None:
    server, engine = _configs(
        "--served-model-name", "tiny", "--api-server-count", "3", "--max-num-seqs", "5",
        "--dtype", "bfloat16", "--no-enable-chunked-prefill", "--allow-private-media-urls",
        "--allowed-media-domains", "a.example", "b.example,c.example", "--max-model-len", "64",
    )  # fmt: skip
    assert server.served_model_name == engine.served_model_name == "tiny"
    assert server.api_server_count == 3 and server.allow_private_media_urls is True
    assert server.allowed_media_domains == ["a.example", "b.example", "c.example"]
    assert engine.max_num_seqs == 5 and engine.dtype == "bfloat16"
    assert engine.enable_chunked_prefill is False and engine.max_model_len == 64
    assert engine.model == "/models/m"


def test_unset_flags_keep_struct_defaults() -> None:
    server, engine = _configs()
    assert server == ServerConfig()
    assert engine.max_num_seqs == 64 and engine.max_model_len is None


def test_cpu_flags_take_a_number_or_auto() -> None:
    server, _ = _configs("--api-server-count", "auto", "--renderer-num-workers", "3")
    assert server.api_server_count == "auto" and server.renderer_num_workers == 3
    assert server.api_server_threads == "auto" and server.engine_cpu_cores == "auto"
    server, _ = _configs("--api-server-threads", "2", "--engine-cpu-cores", "0")
    assert server.api_server_threads == 2 and server.engine_cpu_cores == 0


def test_api_key_from_env_and_flag_wins() -> None:
    server, _ = _configs(env={"FANIN_API_KEY": "from-env"})
    assert server.api_key == "from-env"
    server, _ = _configs("--api-key", "from-flag", env={"FANIN_API_KEY": "from-env"})
    assert server.api_key == "from-flag"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs"),
        (["--port", "70000"], "--port"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
        (["--dtype", "int8"], "--dtype"),
        (["--api-server-count", "two"], "--api-server-count"),
        (["--api-server-count", "0"], "--api-server-count"),
        (["--renderer-num-workers", "some"], "--renderer-num-workers"),
        # past what the cores can use (this machine has at most a few dozen)
        (["--api-server-count", "256"], "--api-server-count"),
        (["--engine-cpu-cores", "100000"], "--engine-cpu-cores"),
        (["--log-level", "loud"], "--log-level"),
    ],
)
def test_bad_value_is_usage_error_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", *argv])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("fanin ")


def test_hub_id_is_refused_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "Qwen/Qwen2-VL-2B-Instruct", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "Qwen/Qwen2-VL-2B-Instruct" in err and "Hugging Face" in err


def test_bad_model_dir_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    assert cli.main(["serve", str(tmp_path), "--port", "0"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_build_model_prints_the_path(
    default_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "built"
    assert cli.main(["build-model", str(target)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.resolve() == target.resolve()
    config = json.loads((printed / "config.json").read_text(encoding="utf-8"))
    assert config == json.loads((default_model_dir / "config.json").read_text(encoding="utf-8"))


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
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(env["NOTIFY_SOCKET"])
        # The launcher's loop pings the watchdog: a full queue must not hang it.
        pinger = threading.Thread(
            target=lambda: sent.extend(notify("WATCHDOG=1", env=env) for _ in range(100)),
            daemon=True,
        )
        pinger.start()
        pinger.join(30)
        assert not pinger.is_alive()
    assert sent[0] and not sent[-1]


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process_only() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None


def test_events_report_ready_exit_and_signals() -> None:
    script = "import os, sys; os.write(int(sys.argv[1]), b'x'); sys.exit(7)"
    with Events() as events:
        child = spawn("t", [sys.executable, "-c", script, "{ready_fd}"], with_ready_pipe=True)
        events.watch(child)
        seen: list[str] = []
        while child.is_alive or "ready" not in seen:
            seen += [tag for tag, obj in events.wait(None) if obj is child]
        assert "ready" in seen and child.exit_code == 7
        silent = spawn("s", [sys.executable, "-c", "pass", "{ready_fd}"], with_ready_pipe=True)
        events.watch(silent)
        while silent.is_alive:
            seen += [tag for tag, obj in events.wait(None) if obj is silent]
        assert not silent.is_ready
        os.kill(os.getpid(), signal.SIGTERM)
        assert ("signal", signal.SIGTERM) in events.wait(None)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_respawn_delay_backs_off_on_crash_loops_only() -> None:
    delays = [respawn_delay(n) for n in range(10)]
    assert delays[0] == 0.0 and 0 < delays[1] < delays[2] < delays[3]
    assert max(delays) == MAX_RESPAWN_DELAY_S


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
    server, _ = cli.configs_from_args(args, model="", env={})
    assert server.host == "0.0.0.0"
    assert float(unit["TimeoutStopSec"]) > server.shutdown_timeout
    assert float(unit["TimeoutStartSec"]) >= server.engine_ready_timeout
