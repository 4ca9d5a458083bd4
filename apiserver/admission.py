"""Admission control: decide from counters alone, before a request's body is read, whether
this server can take it. Turning work away early (429 + Retry-After) keeps latency bounded for
what is admitted and costs the loop nothing."""

from __future__ import annotations

from collections.abc import Callable

from apiserver.errors import ApiError

RETRY_AFTER_S = 1


class Admission:
    """Counts this server's in-flight requests and checks the limits on each new one."""

    def __init__(
        self,
        max_inflight: int,
        max_engine_waiting: int,
        engine_waiting: Callable[[], int],
        renders_full: Callable[[], bool],
    ) -> None:
        self._max_inflight = max_inflight
        self._max_engine_waiting = max_engine_waiting
        self._engine_waiting = engine_waiting
        self._renders_full = renders_full
        self.inflight = 0

    def enter(self) -> None:
        """Count one more request in flight, or raise ApiError(429) saying which limit hit."""
        self.check()
        self.inflight += 1

    def check(self) -> None:
        """Raise ApiError(429) if a new request would pass a limit now."""
        if self.inflight >= self._max_inflight:
            raise self._busy(f"server has {self.inflight} requests in flight")
        if self._engine_waiting() >= self._max_engine_waiting:
            raise self._busy("engine queue is full")
        if self._renders_full():
            raise self._busy("preprocessing queue is full")

    def leave(self) -> None:
        self.inflight -= 1

    @staticmethod
    def _busy(why: str) -> ApiError:
        return ApiError(
            429,
            f"server busy ({why}); retry later",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
