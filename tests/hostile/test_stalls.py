"""Family 4: stalled peers (engine_client's recovery, apiserver.watchdog) and the launcher's
signals. The engine, or one API server, is stopped with SIGSTOP for longer than the heartbeat
timeout and resumed: every server must serve again within a few seconds, and while the engine
is stopped, requests fail fast with 503 instead of hanging. SIGHUP drains like SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fanin_proc import Fanin, descendants, wait_gone
from hostile_kit import HEARTBEAT_TIMEOUT_S, HealthProbe, assert_error, assert_served

pytestmark = pytest.mark.slow

#: How long a resumed peer may take before every server serves again.
RECOVERY_BOUND_S = 10.0
BODY = {"model": "default", "prompt": "one two three", "max_tokens": 2}


@pytest.fixture
def stopped() -> Iterator[list[int]]:
    """Pids the test stopped; each is resumed however the test ends."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


def _serving_servers(url: str, wanted: set[str], attempts: int = 400) -> set[str]:
    """Completions on fresh connections (the kernel picks the server) until each server in
    ``wanted`` answered one with 200; returns the servers that did. Bounded in count and in
    RECOVERY_BOUND_S."""
    seen: set[str] = set()
    deadline = time.monotonic() + RECOVERY_BOUND_S
    with httpx.Client(base_url=url, timeout=5, headers={"connection": "close"}) as http:
        for _ in range(attempts):
            if seen >= wanted or time.monotonic() > deadline:
                break
            try:
                response = http.post("/v1/completions", json=BODY)
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                seen.add(response.headers["x-fanin-server"])
            else:
                time.sleep(0.05)
    return seen


def _stall_engine(url: str, engine_pid: int, stopped: list[int], servers: set[str]) -> None:
    long_request = {**BODY, "max_tokens": 400, "ignore_eos": True}
    with HealthProbe(url, mode="fresh") as probe, ThreadPoolExecutor(1) as pool:
        with httpx.Client(base_url=url, timeout=30) as http:
            inflight = pool.submit(http.post, "/v1/completions", json=long_request)
            time.sleep(0.3)
            os.kill(engine_pid, signal.SIGSTOP)
            stopped.append(engine_pid)
            start = time.monotonic()
            failed = inflight.result(timeout=HEARTBEAT_TIMEOUT_S + 10)
            assert_error(failed, 503, "engine unavailable")
            assert time.monotonic() - start < HEARTBEAT_TIMEOUT_S + 5
            refused = http.post("/v1/completions", json=BODY)  # fast, not a hang
            assert_error(refused, 503, "engine unavailable")
            assert refused.headers["retry-after"] == "1"
            time.sleep(max(0.0, HEARTBEAT_TIMEOUT_S + 1.0 - (time.monotonic() - start)))
        os.kill(engine_pid, signal.SIGCONT)
        stopped.remove(engine_pid)
        resumed = time.monotonic()
        assert _serving_servers(url, servers) == servers
        assert time.monotonic() - resumed < RECOVERY_BOUND_S
    probe.check()


def test_engine_stall_then_every_server_serves_again_fake(fake: Any, stopped: list[int]) -> None:
    _stall_engine(fake.url, fake.engine.pid, stopped, {"0"})
    assert_served(fake.url)


def test_engine_stall_then_every_server_serves_again_real(real: Fanin, stopped: list[int]) -> None:
    engine = real.engine_pid()
    assert engine is not None
    _stall_engine(real.base_url, engine, stopped, {"0", "1"})
    assert "engine is reachable again" in real.log()
    assert_served(real.base_url)


def test_api_server_stall_is_not_a_dead_engine(real: Fanin, stopped: list[int]) -> None:
    """Server 0 stops for longer than the heartbeat timeout; server 1 serves meanwhile; once
    resumed, server 0 serves again and never declared the engine dead."""
    pid = real.server_pid(0)
    assert pid is not None
    before = real.log().count("engine is unavailable")
    os.kill(pid, signal.SIGSTOP)
    stopped.append(pid)
    time.sleep(0.2)  # connections from now on all go to server 1
    with HealthProbe(real.base_url, mode="fresh") as probe:
        assert _serving_servers(real.base_url, {"1"}) == {"1"}
        time.sleep(HEARTBEAT_TIMEOUT_S + 1.0)
    probe.check()
    with HealthProbe(real.base_url, mode="fresh") as probe:
        os.kill(pid, signal.SIGCONT)
        stopped.remove(pid)
        assert _serving_servers(real.base_url, {"0", "1"}) == {"0", "1"}
    probe.check(min_samples=3)
    assert real.server_pid(0) == pid  # the same process: it was never respawned
    assert real.log().count("engine is unavailable") == before


def test_sighup_drains_like_sigterm(real: Fanin) -> None:
    """Last of this folder's tests (conftest orders it so): it drains the shared server."""
    children = descendants(real.proc.pid)
    client = real.client(timeout=60)
    stream = client.completions.create(
        model="default",
        prompt="one two three",
        max_tokens=30,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    real.notices.clear()
    real.proc.send_signal(signal.SIGHUP)
    assert "STOPPING=1" in real.wait_notice("STOPPING=1", 30)
    finish = [c.choices[0].finish_reason for c in stream if c.choices]
    assert finish[-1] == "length"  # the in-flight stream completed during the drain
    assert real.proc.wait(60) == 0
    assert wait_gone(children, 15) == []
    assert "SIGHUP: draining" in real.log()
