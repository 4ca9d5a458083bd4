"""Per-request records and the numbers made from them, defined as vLLM's
``benchmark_serving`` defines them (and named as its JSON names them):

* TTFT: from sending the request to the first chunk that carries output text.
* E2E latency (``e2el``): from sending to the last data event before ``[DONE]``.
* TPOT: ``(e2el - ttft) / (output_tokens - 1)`` for requests with more than one output token.
* ITL: the gaps between consecutive chunks that carry output text, over all requests.
* Throughputs over the run's duration: completed requests, output tokens, and prompt plus
  output tokens per second; goodput counts only the requests that meet every SLO given
  (TPOT of a one-token request counts as 0 there, as in vLLM).
* Statistics of an empty list are 0 (vLLM's ``np.mean(x or 0)``).

Output and prompt token counts come from the final ``usage`` chunk the server sends.

vLLM's duration runs from the first send to the last response, so a short closed-loop window
is diluted by its tail (the last requests finish with fewer in flight: at 64 clients and 3 s
latencies, a 10 s window reads about a fifth low). ``served_in_window`` is the steady rate:
requests (warm-up ones too) that completed between the window's opening and the end of
sending, over that time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (times in seconds, from ``time.perf_counter``)."""

    kind: str
    is_warmup: bool
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: int = 0
    server: str = ""
    success: bool = False
    error: str = ""

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first (0 with fewer than two tokens)."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _stats(name: str, values: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    data = np.asarray(values, dtype=np.float64) * 1000 if len(values) else np.zeros(1)
    out = {
        f"mean_{name}_ms": float(np.mean(data)),
        f"median_{name}_ms": float(np.median(data)),
        f"std_{name}_ms": float(np.std(data)),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(data, p))
    return out


def error_kind(record: RequestRecord) -> str:
    """``http 429``, ``http 503``, ``timeout``, ``connection``, ``stream``: how it failed."""
    if record.status and record.status != 200:
        return f"http {record.status}"
    return record.error.split(":", 1)[0] if record.error else "unknown"


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    percentiles: Sequence[float] = (99,),
    goodput_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """vLLM's metrics over ``records`` (the measured ones) and ``duration_s``."""
    done = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    ttfts = [r.ttft for r in done]
    tpots = [r.tpot for r in done if r.output_tokens > 1]
    itls = [gap for r in done for gap in r.itl]
    e2els = [r.latency for r in done]
    duration = max(duration_s, 1e-9)
    out: dict[str, Any] = {
        "duration": duration_s,
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "rate_limited": sum(1 for r in failed if r.status == 429),
        "errors": dict(Counter(error_kind(r) for r in failed)),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) / duration,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
    }
    if goodput_ms:
        good = sum(1 for r in done if _meets(r, goodput_ms))
        out["request_goodput"] = good / duration
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        out.update(_stats(name, values, percentiles))
    return out


def _meets(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": record.ttft, "tpot": record.tpot, "e2el": record.latency}
    return all(values[name] * 1000 <= slo for name, slo in slos_ms.items())


def latency_summary(seconds: Sequence[float], failures: int) -> dict[str, Any]:
    """Median, p99 and max in ms of probe latencies, with their count and failures."""
    data = np.asarray(seconds, dtype=np.float64) * 1000 if len(seconds) else np.zeros(1)
    return {
        "count": len(seconds),
        "failed": failures,
        "median_ms": float(np.median(data)),
        "p99_ms": float(np.percentile(data, 99)),
        "max_ms": float(np.max(data)),
    }


def server_share(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Completed requests per API server (from the ``x-fanin-server`` header), by index."""
    counts = Counter(r.server or "?" for r in records if r.success)
    return dict(sorted(counts.items(), key=lambda kv: _index_order(kv[0])))


def _index_order(server: str) -> tuple[int, int, str]:
    return (0, int(server), "") if server.isdigit() else (1, 0, server)


def served_in_window(
    records: Sequence[RequestRecord], start: float, end: float
) -> dict[str, float]:
    """Completions and output tokens per second of the requests that ended in [start, end]."""
    ended = [r for r in records if r.success and start <= r.start + r.latency <= end]
    seconds = max(end - start, 1e-9)
    return {
        "window_seconds": end - start,
        "window_completed": len(ended),
        "window_request_throughput": len(ended) / seconds,
        "window_output_throughput": sum(r.output_tokens for r in ended) / seconds,
    }
