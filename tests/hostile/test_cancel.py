"""Family 6: cancellation (request_stream). Clients that leave mid-stream or mid-generation,
many at once and while outputs keep arriving (so that each disconnect races an output): every
one of their requests must be aborted in the engine, which must then be idle again."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fanin_proc import Fanin
from hostile_kit import HealthProbe, assert_served
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

#: Tokens of a request that only an abort ends early.
LONG_TOKENS = 400


def _stream_and_leave(url: str, max_tokens: int) -> str:
    """Start a stream, read its first event, go away; the request id."""
    body = {
        "model": "default",
        "prompt": "one two three four five",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        first = next(response.iter_lines())
    match = re.search(r'"id":"(cmpl-[0-9a-f]+)"', first)
    assert match, first
    return match.group(1)


def test_every_disconnected_stream_is_aborted_fake(fake: Any) -> None:
    """Thirty streams closed right after their first event, six at a time (the server admits
    eight), against an engine that sends a token every 10 ms: each must show up as an ABORT
    in the engine's log (on Python 3.11 some ran to max_tokens instead)."""
    with HealthProbe(fake.url) as probe, ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda _: _stream_and_leave(fake.url, LONG_TOKENS), range(30)))
    for rid in ids:
        fake.wait_for_engine_line(rf"ABORT {rid}$")
    probe.check()
    assert_served(fake.url)


def _engine_running(fanin: Fanin) -> float:
    with httpx.Client(base_url=fanin.base_url, timeout=30) as http:
        text = http.get("/metrics", headers={"connection": "close"}).text
    for family in text_string_to_metric_families(text):
        if family.name == "fanin_engine_running":
            return max(s.value for s in family.samples)
    return 0.0


def test_every_disconnected_stream_is_aborted_real(real: Fanin) -> None:
    """Twenty streams of 8,000 tokens, left after their first event (six at a time): the
    engine's own count of running sequences comes back to zero within seconds, so each was
    aborted (any one that kept running would hold it up for minutes)."""
    with HealthProbe(real.base_url, mode="fresh") as probe, ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda _: _stream_and_leave(real.base_url, 8000), range(20)))
    deadline = time.monotonic() + 15
    while _engine_running(real) > 0:
        assert time.monotonic() < deadline, "requests kept running after their clients left"
        time.sleep(0.2)
    probe.check()
    assert_served(real.base_url)
