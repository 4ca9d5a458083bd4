"""Where a request's time went inside fanin: means over the measured window of the server's
own histograms, from ``/metrics`` read when the window opens and when it closes.

The server's TTFT starts when a rendered request goes to the engine: beside the client's, with
the render queue and render times, it says what came before rendering (HTTP, the body, media);
beside the engine's queue and prefill times (reported by the engine with each first token), what
the hop to the engine and back took. Beside them, how late the servers' event loops ran
(the mean lag, and the share of ticks later than ``LATE_S``: a /health answer waits behind
that too). Servers without these metrics give nothing.
"""

from __future__ import annotations

import contextlib

#: Reported name -> Prometheus histogram (summed over the API servers by their /metrics).
STAGES = {
    "render_queue": "fanin_render_queue_seconds",
    "render": "fanin_render_seconds",
    "ttft": "fanin_time_to_first_token_seconds",
    "engine_queue": "fanin_engine_queue_seconds",
    "engine_prefill": "fanin_engine_prefill_seconds",
    "e2e": "fanin_e2e_request_latency_seconds",
    "loop_lag": "fanin_event_loop_lag_distribution_seconds",
}
#: A loop tick later than this counts as late (a bucket bound of the lag histogram; the
#: /health goal's figure).
LATE_S = "0.005"
_LATE = "loop_late"

Scrape = dict[str, tuple[float, float]]  # histogram -> (sum, count); _LATE -> (late, 0)


def parse(text: str) -> Scrape:
    """The ``_sum`` and ``_count`` of every histogram in ``STAGES``, summed over its series
    (the loop lag has one per API server), and the lag's ticks later than ``LATE_S``."""
    wanted = set(STAGES.values())
    found: dict[str, list[float]] = {}
    late_bucket = f"{STAGES['loop_lag']}_bucket"
    on_time: float | None = None  # loop ticks at most LATE_S late
    for line in text.splitlines():
        series, _, value = line.partition(" ")
        name, _, labels = series.partition("{")
        with contextlib.suppress(ValueError):
            if name == late_bucket and f'le="{LATE_S}"' in labels:
                on_time = (on_time or 0.0) + float(value)
            for suffix, i in (("_sum", 0), ("_count", 1)):
                base = name.removesuffix(suffix)
                if base != name and base in wanted:
                    found.setdefault(base, [0.0, 0.0])[i] += float(value)
    scrape = {k: (v[0], v[1]) for k, v in found.items()}
    lag = scrape.get(STAGES["loop_lag"])
    if on_time is not None and lag is not None:
        scrape[_LATE] = (lag[1] - on_time, 0.0)
    return scrape


def means_ms(before: Scrape, after: Scrape) -> dict[str, float]:
    """Mean milliseconds per observation between two scrapes, for each stage both have, and
    the percentage of loop ticks later than ``LATE_S`` (``loop_late_pct``)."""
    out = {}
    for stage, metric in STAGES.items():
        if metric in before and metric in after:
            total = after[metric][0] - before[metric][0]
            count = after[metric][1] - before[metric][1]
            if count > 0:
                out[stage] = round(1000 * total / count, 2)
                if stage == "loop_lag" and _LATE in before and _LATE in after:
                    late = after[_LATE][0] - before[_LATE][0]
                    out[f"{_LATE}_pct"] = round(100 * late / count, 2)
    return out
