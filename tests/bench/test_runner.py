"""The load generator end to end over real loopback sockets against a scripted server
(tests/bench/stub_server.py): counts, bounds, warm-up, keep-alive, 429s, timeouts. Only lower
bounds of times are checked (the stub waits at least that long); no upper bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from stub_server import TOKENS, Stub

from bench.config import BenchConfig
from bench.images import DistinctImages
from bench.report import run_result
from bench.runner import Run, RunResult
from bench.target import parse_target
from bench.workload import Model, Workload

IMAGES = DistinctImages(32, 32, 500)


def _config(**kw: Any) -> BenchConfig:
    kw.setdefault("progress", False)
    kw.setdefault("output_len", 3)
    kw.setdefault("health_interval_ms", 20.0)
    return msgspec.convert(kw, BenchConfig)


async def _run(stub: Stub, config: BenchConfig) -> RunResult:
    config = msgspec.structs.replace(config, base_url=stub.url)
    workload = Workload(config, Model("stub"), IMAGES)
    return await Run(config, parse_target(stub.url), workload).execute()


def test_closed_loop_counts_429s_and_streams() -> None:
    async def main() -> tuple[RunResult, Stub]:
        async with Stub(reject_every=4, close_every=5) as stub:
            return await _run(stub, _config(num_prompts=24, max_concurrency=3)), stub

    run, stub = asyncio.run(main())
    assert len(run.records) == len(stub.bodies) == 24
    ok = [r for r in run.records if r.success]
    rejected = [r for r in run.records if r.status == 429]
    assert len(rejected) == 6 and len(ok) == 18
    assert all(r.error == "http 429: too busy" for r in rejected)
    for r in ok:
        assert r.ttft >= 0.02  # the stub waits before its first token; the role chunk is no token
        assert r.latency >= 3 * 0.02 and len(r.itl) == len(TOKENS) - 1
        assert r.output_tokens == len(TOKENS) and r.server in ("0", "1")
    # Every request carried its own photo.
    urls = [json.loads(b)["messages"][0]["content"][1]["image_url"]["url"] for b in stub.bodies]
    assert len(set(urls)) == 24 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    # Keep-alive: far fewer connections than requests, though the stub closes some.
    assert 3 <= run.num_connects < 24
    assert run.health_s and run.health_failed == 0 and stub.health_hits == len(run.health_s)
    # /metrics read when the window opened and when it closed: the stub's 10 ms renders.
    assert stub.metrics_hits == 2 and run.server_stages_ms == {"render": 10.0}
    result = run_result(_config(), "stub", run)
    m = result["metrics"]
    assert (m["completed"], m["failed"], m["rate_limited"]) == (18, 6, 6)
    assert m["total_output_tokens"] == 18 * len(TOKENS)
    assert 0 < m["window_completed"] <= 18 and m["window_seconds"] <= run.duration
    assert sum(result["servers"].values()) == 18
    assert result["images_sent"] == 24
    assert result["cpu"]["generator_cores_busy"] >= 0 and "server_cores_busy" not in result["cpu"]


@contextlib.contextmanager
def _stub_in_thread(**kw: Any) -> Iterator[Stub]:
    """A stub serving on an event loop of its own thread, apart from the generator's."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        async with Stub(**kw) as stub:
            box.update(stub=stub, loop=asyncio.get_running_loop(), stop=asyncio.Event())
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield box["stub"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


def test_the_health_probe_goes_on_while_the_generator_loop_is_stalled() -> None:
    """The probe is a process of its own, as a balancer's checks are: a stall of the load
    generator's event loop (here half a second inside a callback) stops no probe, so the
    generator's own lag never reads as the server's."""
    during_stall: list[int] = []

    async def main(stub: Stub) -> RunResult:
        loop = asyncio.get_running_loop()

        def stall_once_probed() -> None:
            if not stub.health_hits:  # the probe process is still starting
                loop.call_later(0.02, stall_once_probed)
                return
            before = stub.health_hits
            time.sleep(0.5)
            during_stall.append(stub.health_hits - before)

        loop.call_soon(stall_once_probed)
        return await _run(stub, _config(num_prompts=400, max_concurrency=2, duration=2.0))

    with _stub_in_thread(token_gap_s=0.01) as stub:
        run = asyncio.run(main(stub))
    # One probe every 20 ms: about 25 in the stall; none if the probe shared the stalled loop.
    assert during_stall and during_stall[0] >= 5
    assert run.health_failed == 0 and stub.health_hits == len(run.health_s)


def test_duration_bounds_the_run_and_warmup_is_left_out() -> None:
    async def main() -> RunResult:
        async with Stub(token_gap_s=0.03) as stub:
            config = _config(num_prompts=500, max_concurrency=2, warmup_seconds=0.3, duration=0.4)
            return await _run(stub, config)

    run = asyncio.run(main())
    warm = [r for r in run.records if r.is_warmup]
    # Each request takes over 90 ms and only two are in flight: far fewer than 500 went out.
    assert warm and run.measured and len(run.records) < 50
    assert all(r.success for r in run.records)
    assert all(r.start >= run.window_start for r in run.measured)
    assert run.window_end >= max(r.start + r.latency for r in run.measured) - 1e-3


def test_poisson_arrivals_are_bounded_by_count() -> None:
    async def main() -> RunResult:
        async with Stub(token_gap_s=0.001) as stub:
            return await _run(stub, _config(num_prompts=15, request_rate=200.0, burstiness=0.5))

    run = asyncio.run(main())
    assert len(run.records) == 15 and all(r.success for r in run.records)


def test_a_request_that_gets_no_answer_times_out() -> None:
    async def main() -> RunResult:
        async with Stub(hang_path="/v1/chat/completions") as stub:
            return await _run(stub, _config(num_prompts=2, max_concurrency=2, request_timeout=0.3))

    run = asyncio.run(main())
    assert [r.error.split(":")[0] for r in run.records] == ["timeout", "timeout"]


def test_no_server_is_a_connection_error_per_request() -> None:
    async def main() -> RunResult:
        async with Stub() as stub:
            url = stub.url
        config = _config(num_prompts=3, max_concurrency=1, health_interval_ms=0.0)
        config = msgspec.structs.replace(config, base_url=url)
        return await Run(config, parse_target(url), Workload(config, Model("m"), IMAGES)).execute()

    run = asyncio.run(main())
    assert len(run.records) == 3 and all(r.error.startswith("connection:") for r in run.records)


def test_all_requests_in_the_warmup_is_an_error() -> None:
    async def main() -> RunResult:
        async with Stub(token_gap_s=0.001) as stub:
            return await _run(stub, _config(num_prompts=2, warmup_seconds=5.0))

    with pytest.raises(RuntimeError, match="warm-up"):
        asyncio.run(main())


def test_requests_still_in_flight_at_the_give_up_time_are_cancelled_and_failed() -> None:
    async def main() -> RunResult:
        async with Stub(token_gap_s=5.0) as stub:
            config = _config(num_prompts=2, max_concurrency=2, duration=0.2)
            config = msgspec.structs.replace(config, base_url=stub.url)
            workload = Workload(config, Model("stub"), IMAGES)
            give_up_at = time.perf_counter() + 0.5
            return await Run(
                config, parse_target(stub.url), workload, give_up_at=give_up_at
            ).execute()

    run = asyncio.run(main())
    assert [r.error.split(":")[0] for r in run.records] == ["cancelled", "cancelled"]
