"""Where a request's time went inside fanin: means over the measured window of the server's
own histograms, from ``/metrics`` read when the window opens and when it closes.

The server's TTFT starts when a rendered request goes to the engine: beside the client's, with
the render queue and render times, it says what came before rendering (HTTP, the body, media);
beside the engine's queue and prefill times (reported by the engine with each first token), what
the hop to the engine and back took. Servers without these metrics give nothing.
"""

from __future__ import annotations

import contextlib
import math

#: Reported name -> Prometheus histogram (summed over the API servers by their /metrics).
STAGES = {
    "render_queue": "fanin_render_queue_seconds",
    "render": "fanin_render_seconds",
    "ttft": "fanin_time_to_first_token_seconds",
    "engine_queue": "fanin_engine_queue_seconds",
    "engine_prefill": "fanin_engine_prefill_seconds",
    "e2e": "fanin_e2e_request_latency_seconds",
}

Scrape = dict[str, tuple[float, float]]  # histogram -> (sum, count)


def parse(text: str) -> Scrape:
    """The ``_sum`` and ``_count`` of every histogram in ``STAGES`` (unlabelled series)."""
    wanted = set(STAGES.values())
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        for suffix, i in (("_sum", 0), ("_count", 1)):
            base = name.removesuffix(suffix)
            if base != name and base in wanted:
                with contextlib.suppress(ValueError):
                    found.setdefault(base, [math.nan, math.nan])[i] = float(value)
    return {k: (v[0], v[1]) for k, v in found.items() if not any(map(math.isnan, v))}


def means_ms(before: Scrape, after: Scrape) -> dict[str, float]:
    """Mean milliseconds per observation between two scrapes, for each stage both have."""
    out = {}
    for stage, metric in STAGES.items():
        if metric in before and metric in after:
            total = after[metric][0] - before[metric][0]
            count = after[metric][1] - before[metric][1]
            if count > 0:
                out[stage] = round(1000 * total / count, 2)
    return out
