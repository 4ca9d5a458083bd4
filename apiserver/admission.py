"""Admission control: decide from counters alone, before a request's body is read, whether
this host can take it. Turning work away early (429 + Retry-After) keeps latency bounded for
what is admitted and costs the loop a few microseconds.

A request is *pending* from its admission until it runs in the engine: waiting for a render
thread, rendering, on the wire, or in the engine's waiting queue. The limits, checked in turn:

1. this server's requests in flight (``--max-inflight-requests``);
2. this server's render queue (``--max-pending-renders``);
3. the host's pending requests (``--max-pending-requests``): each API server publishes its own
   not-yet-sent ones in the shared load table, and the engine's queue arrives with every output
   batch and heartbeat, so the limit holds over all N servers without asking the engine;
4. the wait a new request can expect before its work starts (``--max-queue-wait``): the
   requests queued ahead of it (waiting for a render thread on any server, or in the engine's
   waiting queue) over the rate the engine has been admitting requests, measured while there
   was a queue (a host below capacity says nothing of it, so such time leaves the estimate
   alone; inline, every admitted request but the one on the loop is queued). Requests
   being rendered are in service, not queued:
   counting them refused a closed loop of 4 clients on a 2-core host, whose renders take half
   a second each, for "2.2 s of work" with nothing queued at all;
5. prompt tokens waiting in the engine (``--max-queued-tokens``).

``Retry-After`` is the time the measured drain rate needs to make room (at least 1 s, at most
``MAX_RETRY_AFTER_S``), not a constant: clients that honour it come back when they can be
served.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from apiserver.load_table import LoadTable
from ipc.messages import EngineLoad

MAX_RETRY_AFTER_S = 30
#: The drain rate is measured over windows at least this long (output batches come every
#: engine step, heartbeats every 0.5 s).
DRAIN_WINDOW_S = 0.5
#: Weight of the newest window in the drain rate's moving average.
DRAIN_SMOOTHING = 0.3


class DrainRate:
    """Requests per second the engine starts running while the host has a queue, from the
    engine's cumulative ``num_admitted`` (robust to snapshots that never arrived).

    Only a queue shows capacity: while requests wait for a render thread or in the engine's
    waiting queue, some stage runs flat out and the engine admits at the host's rate. Without
    one the host is below capacity, and a window would measure arrivals, or a pipeline
    filling (the first requests after idle time render and prefill before any is admitted:
    timing that gave 1.8 a second on a 2-core host that drains 5). So idle time ends the open
    window unmeasured, and a window opens at the first snapshot that arrives after a queue is
    seen, not at the one current when it appeared (up to a heartbeat of idle time old).

    A window closes at the first admission at least ``DRAIN_WINDOW_S`` after it opened, so a
    slow drain (requests that run for seconds, fewer than one admission per window) is
    measured too. While a window waits for its first admission the rate cannot be above one
    per the time waited, and the estimate is held to that bound: an engine that stopped
    admitting must not look fast.

    Time is the arrival of the snapshot the count came from, not the clock: a server whose
    requests are all rendering gets no output batch for a while, and its stale count must not
    read as an engine that stopped (that held the estimate to 2 a second under Poisson load
    that the engine drained at 270). A stopped engine still shows: its IO thread heartbeats
    every 0.5 s with the count unchanged."""

    def __init__(self) -> None:
        self.per_s: float | None = None
        self._since: float | None = None  # the open window's start; None: none open
        #: The snapshot current when no queue was seen (or when the first one was): a
        #: window opens only at a later one.
        self._idle_at: float | None = None
        self._admitted = 0

    def observe(self, admitted: int, backlogged: bool, now: float) -> None:
        """Note the engine's count (from the snapshot that arrived at ``now``) and whether
        requests are queued."""
        if not backlogged or admitted < self._admitted:
            # Idle, or a new engine (its count starts from 0 again).
            self._since, self._idle_at, self._admitted = None, now, admitted
            return
        if self._since is None:
            if self._idle_at is None:
                # The first queue this server sees: its snapshot may be far older than a
                # heartbeat (at start-up, the one from before the engine was ready: a window
                # opened there timed the engine's whole load, 13 s, and the 4 servers of a
                # GPU host refused 64 clients for "13 s of work").
                self._idle_at = now
            elif now != self._idle_at:
                self._since, self._admitted = now, admitted
            return
        elapsed = now - self._since
        if elapsed < DRAIN_WINDOW_S:
            return
        grown = admitted - self._admitted
        if not grown:
            if self.per_s is not None:
                self.per_s = min(self.per_s, 1 / elapsed)
            return
        rate = grown / elapsed
        self.per_s = (
            rate
            if self.per_s is None
            else DRAIN_SMOOTHING * rate + (1 - DRAIN_SMOOTHING) * self.per_s
        )
        self._since, self._admitted = now, admitted

    def seconds_for(self, requests: float) -> float | None:
        """How long draining ``requests`` takes at the measured rate (None: not measured)."""
        if self.per_s is None:
            return None
        return requests / self.per_s


class RenderQueue(Protocol):
    """What admission reads of this server's renderer."""

    @property
    def is_full(self) -> bool: ...

    @property
    def queued(self) -> int:
        """Renders waiting for a thread."""
        ...


class Admission:
    """Counts this server's in-flight requests and checks the limits on each new one."""

    def __init__(
        self,
        config: ServerConfig,
        engine_load: Callable[[], tuple[EngineLoad, float]],
        num_sent: Callable[[], int],
        renders: RenderQueue,
        table: LoadTable,
        row: int,
    ) -> None:
        """``engine_load``: the engine's latest load snapshot and when it arrived
        (``time.monotonic()``); ``num_sent``: this server's requests in the engine;
        ``table``/``row``: the shared load table and this server's row in it."""
        self._config = config
        self._engine_load = engine_load
        self._num_sent = num_sent
        self._renders = renders
        self._table = table
        self._row = row
        self.drain = DrainRate()
        self.inflight = 0

    def enter(self) -> None:
        """Count one more request in flight, or raise ApiError(429) saying which limit hit."""
        self.check()
        self.inflight += 1
        self.refresh()

    def leave(self) -> None:
        self.inflight -= 1
        self.refresh()

    def check(self) -> None:
        """Raise ApiError(429) if a new request would pass a limit now."""
        config = self._config
        pending, queued = self.refresh()
        load = self._engine_load()[0]
        if self.inflight >= config.max_inflight_requests:
            raise self._busy(f"server has {self.inflight} requests in flight", 1)
        if self._renders.is_full:
            raise self._busy("preprocessing queue is full", 1)
        if pending >= config.max_pending_requests:
            excess = pending - config.max_pending_requests + 1
            raise self._busy(f"{pending} requests are waiting", self.drain.seconds_for(excess))
        wait = self.drain.seconds_for(queued)
        if config.max_queue_wait > 0 and wait is not None and wait > config.max_queue_wait:
            raise self._busy(
                f"{queued} requests wait to start, about {wait:.1f} s of work",
                wait - config.max_queue_wait,
            )
        if load.num_waiting_tokens >= config.max_queued_tokens:
            excess = load.num_waiting_tokens - config.max_queued_tokens + 1
            per_request = load.num_waiting_tokens / max(load.num_waiting, 1)
            raise self._busy(
                f"{load.num_waiting_tokens} prompt tokens are waiting",
                self.drain.seconds_for(excess / per_request),
            )

    def refresh(self) -> tuple[int, int]:
        """Publish this server's pending and queued requests for every server's limits 3 and
        4, feed the drain rate, and return the host's pending and queued requests. Requests
        also stop pending when they reach the engine, between admissions, so the server's tick
        (every 0.1 s) calls this too: the drain rate is measured whether or not new requests
        arrive."""
        pending_here = max(0, self.inflight - self._num_sent())
        # Inline, the event loop renders one request at a time and every other one admitted
        # here waits for it (the render pool's queue stays empty): counting none of them
        # admitted requests to time out behind the loop (GPU host, 1x overload: 714 client
        # timeouts) instead of refusing them.
        inline = self._config.preprocess_mode == "inline"
        queued_here = max(0, pending_here - 1) if inline else self._renders.queued
        self._table.publish_pending(self._row, pending_here, queued_here)
        load, arrived = self._engine_load()
        queued = load.num_waiting + self._table.total_queued()
        self.drain.observe(load.num_admitted, queued > 0, arrived)
        return load.num_waiting + self._table.total_pending(), queued

    @staticmethod
    def _busy(why: str, retry_after_s: float | None) -> ApiError:
        seconds = min(MAX_RETRY_AFTER_S, max(1, math.ceil(retry_after_s or 1)))
        return ApiError(
            429,
            f"server busy ({why}); retry after {seconds} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(seconds)},
        )
