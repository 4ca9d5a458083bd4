"""The launcher's life cycle with real processes: systemd notifications, draining on SIGTERM,
engine death, a SIGKILLed launcher (and its run dir, removed by the next one), and the errors
that stop it before it starts (and a crash that does not). Each test that destroys a server
starts its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from fanin_proc import (
    START_TIMEOUT_S,
    Fanin,
    cmdline,
    descendants,
    fanin_command,
    free_port,
    get,
    launch_fanin,
    start_fanin,
    wait_gone,
)

from apiserver.launch import default_model

pytestmark = pytest.mark.slow

LONG = {"ignore_eos": True}


def _stream(fanin: Fanin, max_tokens: int) -> openai.Stream:  # type: ignore[type-arg]
    return fanin.client(timeout=120).completions.create(
        model=fanin.client().models.list().data[0].id,
        prompt="Once upon a time",
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=LONG,
    )


def _both_servers_answer_ready(fanin: Fanin) -> None:
    """/ready on fresh connections (the kernel spreads them) gets 200 from server 0 and 1."""
    seen: set[str] = set()
    for _ in range(200):
        response = get(fanin, "/ready")
        assert response.status_code == 200
        seen.add(response.headers["x-fanin-server"])
        if seen == {"0", "1"}:
            break
    assert seen == {"0", "1"}


def _roles(pids: list[int]) -> dict[str, int]:
    """How many of ``pids`` are the engine core and API servers, and how many render workers
    each server has, by their titles (fanin-engine-core, fanin-api-server-I,
    fanin-render-I.J): e.g. {"engine-core": 1, "api-server": 2, "render-0": 1, "render-1": 1};
    the workers per server follow the CPU budget, so callers check only that each has some."""
    roles: dict[str, int] = {}
    for pid in pids:
        title = cmdline(pid).split(" ", 1)[0].removeprefix("fanin-")
        role = title.split(".")[0] if title.startswith("render-") else re.sub(r"-\d+$", "", title)
        roles[role] = roles.get(role, 0) + 1
    return roles


def _is_serve_tree(pids: list[int], servers: int) -> bool:
    """The engine core, ``servers`` API servers, and render workers for each of them."""
    roles = _roles(pids)
    workers = {role for role in roles if role.startswith("render-")}
    return (
        roles.get("engine-core") == 1
        and roles.get("api-server") == servers
        and workers == {f"render-{i}" for i in range(servers)}
    )


def test_ready_and_watchdog_notices_then_sigterm_drains_streams_and_exits_0(
    default_model_dir: Path, tmp_path: Path
) -> None:
    # WatchdogSec=4 in a unit: systemd passes WATCHDOG_USEC and expects pings well within 4 s.
    env = {"WATCHDOG_USEC": "4000000"}
    fanin = start_fanin(tmp_path, default_model_dir, "--api-server-count", "2", env=env)
    try:
        fanin.notices.clear()  # pings from before READY=1
        fanin.wait_notice("WATCHDOG=1", 3)
        fanin.wait_notice("WATCHDOG=1", 3)
        # READY=1 came only after both servers serve: every request succeeds at once, and both
        # servers answer.
        _both_servers_answer_ready(fanin)
        children = descendants(fanin.proc.pid)
        assert _is_serve_tree(children, 2), _roles(children)

        stream = _stream(fanin, max_tokens=200)
        first = next(iter(stream))
        assert first.choices[0].text is not None
        fanin.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in fanin.wait_notice("STOPPING=1", 30)
        usage = None
        finish = None
        for chunk in stream:  # the in-flight stream completes during the drain
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        assert finish == "length" and usage is not None and usage.completion_tokens == 200
        assert fanin.proc.wait(60) == 0
        assert wait_gone(children, 15) == []
        run_dir = re.search(r"run dir (\S+)", fanin.log())
        assert run_dir is not None and not Path(run_dir.group(1)).exists()
    finally:
        fanin.kill_tree()


def test_engine_death_fails_in_flight_requests_with_503_and_exits_nonzero(
    default_model_dir: Path, tmp_path: Path
) -> None:
    fanin = start_fanin(tmp_path, default_model_dir, "--api-server-count", "2")
    try:
        engine = fanin.engine_pid()
        assert engine is not None
        children = descendants(fanin.proc.pid)
        model = fanin.client().models.list().data[0].id
        statuses: list[int] = []
        started = threading.Event()

        def blocking_request() -> None:
            started.set()
            try:
                fanin.client(timeout=60).completions.create(
                    model=model, prompt="hi", max_tokens=7000, extra_body=LONG
                )
            except openai.APIStatusError as e:
                statuses.append(e.status_code)

        waiter = threading.Thread(target=blocking_request)
        stream = _stream(fanin, max_tokens=7000)
        next(iter(stream))  # generation is under way
        waiter.start()
        started.wait()
        # Whether it reached the engine or arrives just after its death, the answer is 503.
        os.kill(engine, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in stream:
                pass
        waiter.join(30)
        assert not waiter.is_alive() and statuses == [503]
        assert time.monotonic() - killed_at < 20  # failed within seconds, no hang
        assert fanin.proc.wait(60) != 0
        assert wait_gone(children, 15) == []
    finally:
        fanin.kill_tree()


def test_default_model_over_uds_then_sigkilled_launcher_takes_children_down(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No MODEL: the cached default model is served (put in place here to skip a rebuild).
    monkeypatch.setenv("FANIN_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(default_model_dir, default_model.default_model_dir())
    temp = tmp_path / "temp"  # where run dirs go
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    uds = tmp_path / "api.sock"  # and on a Unix socket instead of TCP
    fanin = start_fanin(tmp_path, None, "--api-server-count", "2", "--uds", str(uds))
    try:
        children = descendants(fanin.proc.pid)
        assert _is_serve_tree(children, 2), _roles(children)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(uds))) as http:
            models = http.get("http://fanin/v1/models").json()
        assert models["data"][0]["id"] == default_model.default_model_dir().name
        fanin.proc.kill()
        assert wait_gone(children, 15) == []
    finally:
        fanin.kill_tree()
    # Nothing could remove the run dir; the next `fanin serve` does, before it makes its own.
    (stale,) = temp.glob("fanin-*")
    # Private to the user: the engine socket, and configs that may hold the API key.
    assert stale.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in stale.glob("*.json")} == {
        "engine.json": 0o600,
        "server.json": 0o600,
    }
    fanin = start_fanin(tmp_path, None, "--uds", str(uds))
    try:
        assert not stale.exists() and f"removed stale run dir {stale}" in fanin.log()
        fanin.proc.send_signal(signal.SIGTERM)
        assert fanin.proc.wait(60) == 0
        assert list(temp.glob("fanin-*")) == []
    finally:
        fanin.kill_tree()


def _serve_fails(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*fanin_command(), "serve", *argv], capture_output=True, text=True, timeout=120
    )


def test_port_in_use_is_a_clear_error(default_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve_fails(str(default_model_dir), "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode != 0
    assert "already in use" in result.stderr and str(port) in result.stderr


def test_bad_model_dir_names_the_file(default_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(default_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    result = _serve_fails(str(broken), "--port", str(free_port()))
    assert result.returncode == 1
    assert "model.safetensors" in result.stderr


def test_engine_failing_to_load_is_reported_with_its_exit_code(
    default_model_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "unknown-arch"
    shutil.copytree(default_model_dir, broken)
    config = json.loads((broken / "config.json").read_text(encoding="utf-8"))
    config.update(architectures=["NoSuchModelForCausalLM"], model_type="no_such_model")
    (broken / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = _serve_fails(str(broken), "--port", "0")
    assert result.returncode != 0
    assert "engine core exited with code 1 during startup" in result.stderr


def test_an_api_server_crashing_during_startup_is_started_again(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """A server killed by a signal before it is ready (one of 14 died of SIGSEGV at start on
    the GPU host, and the whole start failed with it) is started again, and `fanin serve`
    comes up with every server; its stack is in the log."""
    fanin = launch_fanin(tmp_path, default_model_dir, "--api-server-count", "2")
    try:
        started = re.compile(r"api server 1 started \(pid (\d+)\)")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (found := started.search(fanin.log())) and time.monotonic() < deadline:
            assert fanin.proc.poll() is None, fanin.log()[-3000:]
            time.sleep(0.02)
        assert found, fanin.log()[-3000:]
        crashed = int(found.group(1))
        os.kill(crashed, signal.SIGSEGV)  # it waits for the engine's READY: not ready yet
        fanin.wait_notice("READY=1", START_TIMEOUT_S)
        log = fanin.log()
        assert (
            f"api server 1 (pid {crashed}) was killed by SIGSEGV during startup; "
            "starting it again" in log
        )
        assert "Fatal Python error: Segmentation fault" in log
        _both_servers_answer_ready(fanin)
    finally:
        fanin.kill_tree()


def test_second_sigint_exits_at_once(default_model_dir: Path, tmp_path: Path) -> None:
    fanin = start_fanin(
        tmp_path, default_model_dir, "--api-server-count", "2", "--shutdown-timeout", "300"
    )
    try:
        children = descendants(fanin.proc.pid)
        stream = _stream(fanin, max_tokens=7000)
        next(iter(stream))  # a long generation keeps the first SIGINT's drain waiting
        fanin.proc.send_signal(signal.SIGINT)
        fanin.wait_notice("STOPPING=1", 30)
        fanin.proc.send_signal(signal.SIGINT)
        assert fanin.proc.wait(30) != 0
        assert wait_gone(children, 15) == []
        # Cut off, not drained: a drained stream would end normally (finish_reason "length").
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in stream:
                pass
    finally:
        fanin.kill_tree()
