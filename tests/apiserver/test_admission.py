"""Admission decides from counters alone, before a body is read: each limit, the host-wide
queue shared through the load table, and Retry-After from the measured drain rate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from apiserver.admission import MAX_RETRY_AFTER_S, Admission, DrainRate
from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from apiserver.load_table import LoadTable
from ipc.messages import EngineLoad


class Host:
    """Two API servers' admissions over one load table, and a settable engine snapshot."""

    def __init__(self, tmp_path: Path, **limits: object) -> None:
        self.table = LoadTable.create(str(tmp_path / "load"), 2)
        self.config = ServerConfig(**limits)  # type: ignore[arg-type]
        self.load = EngineLoad()
        self.sent = [0, 0]
        self.renders = [SimpleNamespace(is_full=False, queued=0) for _ in range(2)]
        self.now = 0.0
        self.servers = [
            Admission(
                self.config,
                lambda: (self.load, self.now),
                lambda i=i: self.sent[i],
                self.renders[i],
                self.table,
                i,
            )
            for i in range(2)
        ]

    def refused(self, server: int) -> ApiError:
        with pytest.raises(ApiError) as err:
            self.servers[server].enter()
        assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
        return err.value


def test_each_limit_gives_429_naming_it(tmp_path: Path) -> None:
    host = Host(tmp_path, max_inflight_requests=2, max_pending_requests=3, max_queued_tokens=500)
    a = host.servers[0]
    a.enter()
    a.enter()
    assert "2 requests in flight" in host.refused(0).message
    host.sent[0] = 2  # both reached the engine: nothing of server 0 is pending any more
    a.leave()
    host.renders[0].is_full = True
    assert "preprocessing queue" in host.refused(0).message
    host.renders[0].is_full = False
    host.load = EngineLoad(num_waiting=3)
    assert "3 requests are waiting" in host.refused(0).message
    host.load = EngineLoad(num_waiting=1, num_waiting_tokens=500)
    assert "500 prompt tokens" in host.refused(0).message
    host.load = EngineLoad()
    a.enter()
    assert a.inflight == 2


def test_the_pending_limit_holds_over_all_servers(tmp_path: Path) -> None:
    host = Host(tmp_path, max_pending_requests=3)
    a, b = host.servers
    a.enter()
    a.enter()  # two requests rendering on server 0, none sent yet
    assert host.table.total_pending() == 2
    b.enter()  # the host's third
    err = host.refused(1)
    assert "3 requests are waiting" in err.message
    host.refused(0)
    host.sent[0] = 2  # server 0's two reach the engine and start running at once
    a.refresh()  # what each server does on every enter, leave, check and 100 ms tick
    assert host.table.total_pending() == 1
    b.check()  # room again


def test_check_refuses_without_counting(tmp_path: Path) -> None:
    host = Host(tmp_path, max_inflight_requests=1)
    a = host.servers[0]
    a.check()
    assert a.inflight == 0
    a.enter()
    with pytest.raises(ApiError, match="in flight"):
        a.check()


def test_retry_after_is_the_time_the_measured_drain_needs(tmp_path: Path) -> None:
    host = Host(tmp_path, max_pending_requests=50, max_queue_wait=0)
    a = host.servers[0]
    # The engine drains 10 requests a second while 60 wait.
    for step in range(10):
        host.now = step * 0.5
        host.load = EngineLoad(num_waiting=60, num_admitted=5 * step)
        with pytest.raises(ApiError):
            a.check()
    assert a.drain.per_s == pytest.approx(10.0)
    err = host.refused(0)
    assert err.headers["Retry-After"] == "2"  # 11 over the limit at 10 a second: 1.1 s -> 2
    host.load = EngineLoad(num_waiting=10_000, num_admitted=45)
    assert host.refused(0).headers["Retry-After"] == str(MAX_RETRY_AFTER_S)


def test_the_wait_limit_uses_the_drain_rate_once_measured(tmp_path: Path) -> None:
    host = Host(tmp_path, max_queue_wait=2.0)
    a = host.servers[0]
    host.load = EngineLoad(num_waiting=30)
    a.check()  # no rate measured yet: only the count limits apply
    host.now = 0.25
    a.check()  # a newer snapshot: the window opens
    host.now, host.load = 0.75, EngineLoad(num_waiting=30, num_admitted=5)  # 10 a second
    err = host.refused(0)
    assert "about 3.0 s of work" in err.message and err.headers["Retry-After"] == "1"
    host.load = EngineLoad(num_waiting=15, num_admitted=5)
    a.check()  # 1.5 s of work: admitted


def _drain_two_a_second(host: Host, server: Admission, waiting: int) -> None:
    """``server`` measures a drain of 2 requests a second while ``waiting`` wait in the
    engine (the window opens at the second snapshot), then the engine's queue empties."""
    host.load = EngineLoad(num_waiting=waiting)
    server.refresh()
    host.now = 0.5
    server.refresh()
    host.now, host.load = 1.5, EngineLoad(num_waiting=waiting, num_admitted=2)
    server.refresh()
    assert server.drain.per_s == pytest.approx(2.0)
    host.load = EngineLoad(num_admitted=2)


def test_the_wait_counts_queued_renders_not_those_in_service(tmp_path: Path) -> None:
    """Requests on a render thread are being served: only those waiting for one (on any
    server) and the engine's waiting queue are ahead of a new request."""
    host = Host(tmp_path, max_queue_wait=2.0)
    a, b = host.servers
    _drain_two_a_second(host, a, waiting=3)
    for _ in range(6):  # six renders in service on server 0, none queued
        a.enter()
    a.check()  # 6 pending are 3 s at that rate, but none of them is queued
    host.renders[1].queued = 4  # four wait for a thread on server 1
    b.refresh()
    host.load = EngineLoad(num_admitted=2, num_waiting=1)  # and one in the engine's queue
    assert "5 requests wait to start, about 2.5 s of work" in host.refused(0).message


def test_inline_every_admitted_request_but_one_waits_for_the_loop(tmp_path: Path) -> None:
    """Inline, the loop renders one request at a time: the rest of those admitted and not yet
    in the engine are queued (the render pool's count stays at 0)."""
    host = Host(tmp_path, max_queue_wait=2.0, preprocess_mode="inline")
    a = host.servers[0]
    _drain_two_a_second(host, a, waiting=1)
    for _ in range(6):  # one rendering on the loop, five waiting for it: 2.5 s of work
        a.enter()
    assert "5 requests wait to start, about 2.5 s of work" in host.refused(0).message


def test_idle_time_leaves_the_drain_rate_alone() -> None:
    drain = DrainRate()
    drain.observe(0, True, -0.5)
    drain.observe(0, True, 0.0)
    drain.observe(20, True, 1.0)
    assert drain.per_s == pytest.approx(20.0)
    for t in range(2, 20):  # idle: nothing pending, nothing admitted
        drain.observe(20, False, float(t))
    assert drain.per_s == pytest.approx(20.0)
    drain.observe(3, True, 21.0)  # a new engine counts from 0 again: no negative rate
    drain.observe(13, True, 22.0)
    assert drain.per_s is not None and drain.per_s > 0
    assert drain.seconds_for(14) == pytest.approx(14 / drain.per_s)


def test_only_time_with_a_queue_measures_the_drain() -> None:
    """The snapshot current when a queue appears is up to a heartbeat of idle time old: the
    window opens with the next one. Time without a queue (requests rendering, none waiting)
    is a host below capacity: it measures nothing."""
    drain = DrainRate()
    drain.observe(0, False, 0.0)  # an idle heartbeat
    drain.observe(0, True, 0.0)  # a burst is queued: same snapshot
    drain.observe(1, True, 0.5)  # the next snapshot opens the window
    drain.observe(11, True, 1.5)
    assert drain.per_s == pytest.approx(10.0)
    drain.observe(12, False, 2.0)  # renders in service, nothing queued: a slow trickle
    drain.observe(13, False, 4.0)
    assert drain.per_s == pytest.approx(10.0)


def test_the_first_queue_does_not_time_the_engines_start() -> None:
    """A server's first snapshot can be from before the engine was ready (on a GPU host, 13 s
    before its first heartbeat): a queue seen then opens the window at the next snapshot."""
    drain = DrainRate()
    drain.observe(0, True, 0.0)  # 64 clients queue at once; the snapshot is from start-up
    drain.observe(0, True, 13.0)  # the engine's first heartbeat
    drain.observe(100, True, 14.0)
    assert drain.per_s == pytest.approx(100.0)


def test_a_slow_drain_is_measured_and_a_stalled_one_is_not_taken_for_fast() -> None:
    """Requests that run for 2 s each: fewer than one admission per window, still measured
    (the server's tick observes every 0.1 s); then the engine stops admitting."""
    drain = DrainRate()
    drain.observe(0, True, -0.1)
    for tick in range(101):  # 10 s, an admission every 2 s
        drain.observe(tick // 20, True, tick / 10)
    assert drain.per_s == pytest.approx(0.5)
    for tick in range(101, 201):  # 10 s more, no admission
        drain.observe(5, True, tick / 10)
    assert drain.per_s is not None and drain.per_s <= 1 / 10
    assert drain.seconds_for(3) is not None and drain.seconds_for(3) >= 30


def test_a_stale_snapshot_is_not_taken_for_a_stopped_engine() -> None:
    """A server whose requests are all rendering gets no output batch for a while: observing
    the same snapshot again (the 0.1 s ticks) says nothing; the engine's heartbeats, with the
    count unchanged, do say it stopped."""
    drain = DrainRate()
    drain.observe(0, True, -0.5)
    drain.observe(0, True, 0.0)
    drain.observe(100, True, 1.0)
    assert drain.per_s == pytest.approx(100.0)
    for _ in range(30):  # three seconds of ticks, no new snapshot
        drain.observe(100, True, 1.0)
    assert drain.per_s == pytest.approx(100.0)
    for t in (1.5, 2.0, 2.5):  # heartbeats: no admission for a second and a half
        drain.observe(100, True, t)
    assert drain.per_s is not None and drain.per_s <= 1.0
