"""Admission against the real engine: the host-wide queue limit refuses on every API server
once the engine's queue is full, with an OpenAI 429, and Retry-After grows with the work
waiting, as measured from the engine's drain rate (not a constant)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fanin_proc import Fanin, start_fanin

pytestmark = pytest.mark.slow

NAME = "admission"
#: One sequence at a time in the engine: every other request waits in its queue.
FLAGS = ("--api-server-count", "2", "--served-model-name", NAME, "--max-num-seqs", "1")
#: Each backlog request runs for about this long, so that the queue drains slowly: two
#: waiting are ~4 s of work, Retry-After ~3.5 s against the >= 2 asserted. A fixed token
#: count did not say that on every machine (400 took under half a second once torch got
#: faster; 2000 took 4 s on the 2-core CI machine, 16 s of backlog to wait out).
REQUEST_S = 2.0
#: Backlog requests started at most (the refused ones are replaced).
MAX_BACKLOG = 24
#: Tokens of the probe that measures this machine's decode rate.
PROBE_TOKENS = 200


@pytest.fixture(scope="module")
def fanin(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fanin]:
    running = start_fanin(
        tmp_path_factory.mktemp("admission"),
        default_model_dir,
        *FLAGS,
        *("--max-pending-requests", "3", "--max-queue-wait", "0.5"),
    )
    yield running
    running.kill_tree()


def _post(fanin: Fanin, max_tokens: int) -> httpx.Response:
    """One completion on a fresh connection (either API server may take it)."""
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": max_tokens}
    body["ignore_eos"] = True
    with httpx.Client(base_url=fanin.base_url, timeout=120) as http:
        return http.post("/v1/completions", json=body, headers={"connection": "close"})


def _backlog_tokens(fanin: Fanin) -> int:
    """Tokens that take one request about ``REQUEST_S`` here, from a lone probe's rate (a
    lower bound: the probe's time holds its HTTP round trip and prefill, and longer
    generations only get slower per token)."""
    start = time.monotonic()
    assert _post(fanin, PROBE_TOKENS).status_code == 200
    per_s = PROBE_TOKENS / (time.monotonic() - start)
    return max(400, min(8000, round(REQUEST_S * per_s)))


def _refused(probes: list[httpx.Response], backlog: list[httpx.Response]) -> list[httpx.Response]:
    """The probes' refusals and the backlog's (each checked as an OpenAI 429 here)."""
    refused = probes + [r for r in list(backlog) if r.status_code == 429]
    for r in refused:
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
    return refused


def test_a_full_queue_is_refused_by_every_server_with_a_measured_retry_after(
    fanin: Fanin,
) -> None:
    tokens = _backlog_tokens(fanin)
    answers: list[httpx.Response] = []
    backlog = [threading.Thread(target=lambda: answers.append(_post(fanin, tokens)))]
    backlog[0].start()
    refusals: list[httpx.Response] = []
    deadline = time.monotonic() + 90
    # One request runs and three wait (the limit); then probe until each server has refused
    # one, and one was refused for the expected wait. Backlog requests refused for the wait
    # are replaced, so the queue stays full while the probes go on (once, with the backlog
    # counted only as started, it drained and 90 s of probes were all served).
    while time.monotonic() < deadline:
        in_flight = sum(thread.is_alive() for thread in backlog)
        probe = _post(fanin, 1) if in_flight >= 4 or len(backlog) >= MAX_BACKLOG else None
        if probe is None:
            thread = threading.Thread(target=lambda: answers.append(_post(fanin, tokens)))
            thread.start()
            backlog.append(thread)
            time.sleep(0.3)
            continue
        if probe.status_code == 200:
            time.sleep(0.2)
            continue
        assert probe.status_code == 429, probe.text
        refusals.append(probe)
        refused = _refused(refusals, answers)
        servers = {r.headers["x-fanin-server"] for r in refused}
        if servers == {"0", "1"} and any("s of work" in r.text for r in refused):
            break
        time.sleep(0.2)
    # A backlog request refused for the wait counts as well: which server a fresh connection
    # reaches follows the spread, so a server holding more of the backlog's connections may
    # take none of the probes.
    refused = _refused(refusals, answers)
    assert {r.headers["x-fanin-server"] for r in refused} == {"0", "1"}, refused
    waits = [r for r in refused if "s of work" in r.json()["error"]["message"]]
    assert waits, [r.json() for r in refused]
    # A queue of requests that each run for seconds: the wait is more than a second away.
    assert max(int(r.headers["retry-after"]) for r in waits) >= 2
    for thread in backlog:
        thread.join(180)
    # The backlog is let in, except where the drain rate was measured before all of it came:
    # then the queue-wait limit refuses the rest of it too (how much gets in is a race).
    statuses = [a.status_code for a in answers]
    assert len(answers) == len(backlog) and 200 in statuses, statuses
    for answer in answers:  # served, or refused by the queue's limits (checked in _refused)
        assert answer.status_code == 200 or "wait" in answer.json()["error"]["message"]
    assert _post(fanin, 1).status_code == 200  # drained: admitted again
