"""Prometheus metrics of one API server. With ``PROMETHEUS_MULTIPROC_DIR`` set (the launcher
sets it before this module is imported) every process writes its own mmap files and
``/metrics`` sums them over all API servers."""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("fanin_requests", "HTTP requests answered", ["endpoint", "status"])
PROMPT_TOKENS = Counter("fanin_prompt_tokens", "prompt tokens of finished requests")
GENERATION_TOKENS = Counter("fanin_generation_tokens", "tokens generated")
TTFT = Histogram("fanin_time_to_first_token_seconds", "time to first token", buckets=_LATENCY)
E2E = Histogram("fanin_e2e_request_latency_seconds", "request latency", buckets=_LATENCY)
TPOT = Histogram("fanin_time_per_output_token_seconds", "time per output token", buckets=_FAST)
RENDER = Histogram(
    "fanin_render_seconds", "preprocessing time per request, on a render thread", buckets=_FAST
)
RENDER_QUEUE = Histogram(
    "fanin_render_queue_seconds", "time a request waited for a render thread", buckets=_FAST
)
ENGINE_QUEUE = Histogram(
    "fanin_engine_queue_seconds",
    "time a request waited in the engine's queue before its first step",
    buckets=_FAST,
)
ENGINE_PREFILL = Histogram(
    "fanin_engine_prefill_seconds",
    "time from a request's first engine step to its first token (encoding, prefill)",
    buckets=_FAST,
)
ENGINE_RUNNING = Gauge(
    "fanin_engine_running", "requests running in the engine", multiprocess_mode="mostrecent"
)
ENGINE_WAITING = Gauge(
    "fanin_engine_waiting", "requests waiting in the engine", multiprocess_mode="mostrecent"
)
ENGINE_KV_USAGE = Gauge(
    "fanin_engine_kv_cache_usage",
    "share of the engine's KV cache slots taken",
    multiprocess_mode="mostrecent",
)
ENGINE_ENCODER_CACHE = Gauge(
    "fanin_engine_encoder_cache_bytes",
    "bytes of image-encoder outputs the engine caches",
    multiprocess_mode="mostrecent",
)
INFLIGHT = Gauge(
    "fanin_server_inflight", "requests in flight", ["server"], multiprocess_mode="livesum"
)
LOOP_LAG = Gauge(
    "fanin_event_loop_lag_seconds",
    "how late the API server's event loop ran its latest timer",
    ["server"],
    multiprocess_mode="mostrecent",
)
LOOP_LAG_HISTOGRAM = Histogram(
    "fanin_event_loop_lag_distribution_seconds",
    "how late the API server's event loop ran each timer (every 20 ms)",
    ["server"],
    buckets=_FAST,
)


def render_latest() -> bytes:
    """The text exposition of every process's metrics (blocking file reads: run off-loop)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_dead(pid: int) -> None:
    """Drop a finished process's live gauges from the sums."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
