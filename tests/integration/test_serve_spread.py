"""The even spread over API servers, end to end: `fanin serve --api-server-count 6` and 48
keep-alive clients (official OpenAI clients, one connection each, kept from test to test) on
a 2-core machine. Every server's request count stays within 15 % of the mean, with no error;
a drained server (SIGTERM) hands its clients over without any of them seeing an error; a
killed server costs only the requests in flight on it, and once the two are respawned the
spread is even again. The tests share one `fanin serve` and run in file order."""

from __future__ import annotations

import collections
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest
from fanin_proc import Fanin, is_alive, start_fanin, wait_gone

from bench.datasets import sharegpt_prompts
from bench.serve import respawns_in

pytestmark = pytest.mark.slow

SERVERS = 6
CLIENTS = 48
TOLERANCE = 0.15
#: Wall-clock bound of one load phase, whatever the machine.
PHASE_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def six(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fanin]:
    running = start_fanin(
        tmp_path_factory.mktemp("spread"),
        default_model_dir,
        *("--api-server-count", str(SERVERS), "--max-num-seqs", str(CLIENTS)),
        # 48 clients keep a 2-core engine's queue about 2 s deep: the queue-wait limit would
        # refuse some of them, which is admission's business (its own tests), not the spread's.
        *("--max-queue-wait", "0"),
    )
    yield running
    running.kill_tree()


@pytest.fixture(scope="module")
def clients(six: Fanin) -> Iterator[list[tuple[openai.OpenAI, str]]]:
    """One OpenAI client (so one keep-alive connection) and one ShareGPT prompt per client."""
    pairs = [(six.client(timeout=60), p) for p in sharegpt_prompts(CLIENTS, max_chars=400)]
    yield pairs
    for api, _ in pairs:
        api.close()


@dataclass
class Load:
    """What a load phase saw: requests answered per server index, and failures."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def assert_even(self) -> None:
        mean = self.total / SERVERS
        assert sorted(self.counts) == [str(i) for i in range(SERVERS)], self.counts
        for server, n in self.counts.items():
            assert abs(n - mean) <= TOLERANCE * mean, (server, n, mean, self.counts)


def _run(
    clients: list[tuple[openai.OpenAI, str]],
    per_client: int,
    during: Callable[[Load], None] | None = None,
) -> Load:
    """Every client in a closed loop, ``per_client`` completions each, with ``during(load)``
    run meanwhile in this thread. A client whose request fails goes on with the next one."""
    load = Load()
    model = clients[0][0].models.list().data[0].id
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    start = threading.Barrier(len(clients) + 1)

    def client(api: openai.OpenAI, prompt: str) -> None:
        start.wait()
        for _ in range(per_client):
            if time.monotonic() > deadline:
                with load.lock:
                    load.errors.append("phase timed out")
                return
            try:
                raw = api.completions.with_raw_response.create(
                    model=model, prompt=prompt, max_tokens=1
                )
                raw.parse()
                with load.lock:
                    load.counts[raw.headers["x-fanin-server"]] += 1
            except openai.APIError as e:
                with load.lock:
                    load.errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=pair) for pair in clients]
    for thread in threads:
        thread.start()
    start.wait()
    try:
        if during is not None:
            during(load)
    finally:
        for thread in threads:
            thread.join(PHASE_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    return load


def _until(
    condition: Callable[[], bool], why: Callable[[], object] = str, timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, why()
        time.sleep(0.01)


def _wait_respawned(fanin: Fanin, index: int) -> None:
    """Until API server ``index`` serves again after it last exited (the launcher logs both)."""
    exited = re.compile(rf"api server {index} \(pid \d+\) exited")
    ready = f"api server {index} ready (pid "

    def respawned() -> bool:
        log = fanin.log()
        last = [m.end() for m in exited.finditer(log)]
        return bool(last) and ready in log[last[-1] :]

    _until(respawned, lambda: fanin.log()[-4000:])


def test_keep_alive_clients_spread_evenly(clients: list[tuple[openai.OpenAI, str]]) -> None:
    load = _run(clients, per_client=10)
    assert not load.errors, load.errors[:5]
    assert load.total == CLIENTS * 10
    load.assert_even()


def _signal_midway(
    fanin: Fanin, clients: list[tuple[openai.OpenAI, str]], index: int, sig: signal.Signals
) -> tuple[int, Load]:
    """Load of 8 requests per client; once two per client are answered, ``sig`` to API
    server ``index``, which must then be gone soon. Its pid and the load (whose other six
    requests per client all come after the signal)."""
    pid = fanin.server_pid(index)
    assert pid is not None

    def during(load: Load) -> None:
        _until(lambda: load.total >= CLIENTS * 2, lambda: (load, fanin.log()[-4000:]))
        os.kill(pid, sig)
        assert wait_gone([pid], 60) == [], fanin.log()[-4000:]

    return pid, _run(clients, per_client=8, during=during)


def test_a_drained_server_hands_its_clients_over_without_an_error(
    six: Fanin, clients: list[tuple[openai.OpenAI, str]]
) -> None:
    _, load = _signal_midway(six, clients, 3, signal.SIGTERM)
    assert not load.errors, load.errors[:5]
    assert load.total == CLIENTS * 8
    assert re.search(r"api server 3 \(pid \d+\) exited with code 0", six.log())
    # what a sweep finds in its server's log to flag a run during which a server died
    assert any("api server 3 " in line for line in respawns_in(six.log_path))


def test_a_killed_server_costs_only_its_own_requests_then_all_rebalance(
    six: Fanin, clients: list[tuple[openai.OpenAI, str]]
) -> None:
    pid, load = _signal_midway(six, clients, 2, signal.SIGKILL)
    # Requests in flight on the killed server's connections fail (about one per connection
    # it held, a sixth of the clients); every other request is answered.
    assert all("Connection" in e for e in load.errors), load.errors[:5]
    assert len(load.errors) <= 2 * CLIENTS // SERVERS, load.errors
    assert load.total + len(load.errors) == CLIENTS * 8
    assert not is_alive(pid)
    _wait_respawned(six, 2)
    _wait_respawned(six, 3)
    # The respawned servers start with no connection: the others hand clients over as their
    # share is exceeded, which takes a few requests per client. Measured from the start, the
    # newest server lagged by up to 19 % in 1 of 7 runs on the 2-core machine.
    settling = _run(clients, per_client=2)
    assert not settling.errors, settling.errors[:5]
    load = _run(clients, per_client=6)  # both respawned servers take their share again
    assert not load.errors, load.errors[:5]
    load.assert_even()
