"""The API servers' and launcher's configuration: what a user sets, built once by the CLI,
frozen, handed to each API-server process as JSON. Each field's description is its ``--flag``
help text (the CLI is built from the fields of this struct and of ``ipc.config.EngineConfig``,
each setting in one of them). The wiring of one run (the engine's address, the metrics
directory, inherited fds) is not configuration: the launcher passes it on each server's
command line.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MiB = 1 << 20


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: Annotated[str, Meta(description="address to listen on")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="TCP port to listen on")] = 8000
    uds: Annotated[
        str | None, Meta(description="listen on this Unix domain socket instead of host:port")
    ] = None
    api_key: Annotated[
        str | None,
        Meta(description="require 'Authorization: Bearer KEY' (also read from FANIN_API_KEY)"),
    ] = None
    served_model_name: Annotated[
        str | None, Meta(description="model name in the API; default: the model path's last part")
    ] = None
    api_server_count: Annotated[
        Annotated[int, Meta(ge=1, le=256)] | Literal["auto"],
        Meta(
            description="number of API-server processes; auto: one per 2 cores left after the "
            "engine core's (a server keeps one GIL-bound thread and about one core of render "
            "threads busy), at most 32"
        ),
    ] = "auto"
    renderer_num_workers: Annotated[
        Annotated[int, Meta(ge=1, le=64)] | Literal["auto"],
        Meta(
            description="preprocessing threads per API server (and, in --preprocess-mode "
            "process, as many worker processes); auto: its share of the cores, at least 2"
        ),
    ] = "auto"
    api_server_threads: Annotated[
        Annotated[int, Meta(ge=1, le=64)] | Literal["auto"],
        Meta(
            description="math threads per API server (torch intra-op and inter-op, OpenMP, MKL, "
            "OpenBLAS, tokenizers); auto: its share of the cores per render worker"
        ),
    ] = "auto"
    gil_switch_interval: Annotated[
        float,
        Meta(
            gt=0,
            le=100,
            description="milliseconds a thread holding an API server's GIL (a render thread in "
            "the image processor's Python) keeps it while the event loop waits for it: "
            "Python's switch interval (its default: 5). Every callback of the loop may wait "
            "this long, so it bounds /health and first-byte latency under load",
        ),
    ] = 1.0
    engine_cpu_cores: Annotated[
        Annotated[int, Meta(ge=0)] | Literal["auto"],
        Meta(description="cores kept out of the API servers' share for the engine core; auto: 2"),
    ] = "auto"
    max_pending_renders: Annotated[
        int, Meta(ge=1, description="requests waiting for a preprocessing thread before 429")
    ] = 64
    max_inflight_requests: Annotated[
        int, Meta(ge=1, description="requests in flight per API server before 429")
    ] = 1024
    max_pending_requests: Annotated[
        int,
        Meta(
            ge=1,
            description="requests waiting on this host (admitted by any API server and not yet "
            "running in the engine) before new ones get 429",
        ),
    ] = 1024
    max_queue_wait: Annotated[
        float,
        Meta(
            ge=0,
            description="seconds a new request may expect to wait before it runs (the host's "
            "pending requests over the rate the engine has been draining them); above it, "
            "429 (0: no such limit). Lower bounds an admitted request's TTFT under overload "
            "more tightly but refuses some of a closed loop's bursts (bench/results/overload.md)",
        ),
    ] = 2.0
    max_queued_tokens: Annotated[
        int,
        Meta(ge=1, description="prompt tokens waiting in the engine before new requests get 429"),
    ] = 1 << 20
    max_request_body_bytes: Annotated[
        int, Meta(ge=1024, description="largest request body accepted (413 above)")
    ] = 64 * MiB
    max_media_bytes: Annotated[
        int, Meta(ge=1024, description="largest image download or data: URL payload")
    ] = 20 * MiB
    max_image_pixels: Annotated[
        int, Meta(ge=1, description="largest decoded image (width*height; decompression bombs)")
    ] = 40_000_000
    max_images_per_request: Annotated[int, Meta(ge=0, description="images per request")] = 8
    allowed_media_domains: Annotated[
        list[str] | None,
        Meta(description="if set, http(s) images only from these domains (and subdomains)"),
    ] = None
    allowed_local_media_path: Annotated[
        str | None, Meta(description="allow file:// image URLs under this directory")
    ] = None
    allow_private_media_urls: Annotated[
        bool,
        Meta(description="allow http(s) images from private, loopback and link-local addresses"),
    ] = False
    media_fetch_timeout: Annotated[
        float, Meta(gt=0, description="seconds allowed for one image download")
    ] = 10.0
    request_timeout: Annotated[
        float, Meta(gt=0, description="seconds before a request is aborted with 408")
    ] = 600.0
    shutdown_timeout: Annotated[
        float, Meta(ge=0, description="seconds in-flight requests get to finish on SIGTERM")
    ] = 30.0
    shutdown_delay: Annotated[
        float,
        Meta(
            ge=0,
            le=600,
            description="seconds after SIGTERM during which the servers go on serving while "
            "/ready answers 503, before they stop accepting: set it above a load balancer's "
            "check interval times its fall count, so no request reaches a closing socket",
        ),
    ] = 0.0
    engine_ready_timeout: Annotated[
        float, Meta(gt=0, description="seconds to wait for the engine to load the model")
    ] = 900.0
    preprocess_mode: Annotated[
        Literal["pool", "process", "inline"],
        Meta(
            description="'process': chats with images on --renderer-num-workers worker "
            "processes per API server, below every other process in the scheduler's order "
            "(text-only chats on the render thread pool), so that the event loop never waits "
            "for a render's GIL; 'pool': all preprocessing on the render thread pool; "
            "'inline': on the event loop, which it blocks (the old one-process behaviour; for "
            "benchmark baselines only, never for serving)"
        ),
    ] = "process"
    # Hostile clients and stalled peers: every read bounded in bytes and time.
    max_header_bytes: Annotated[
        int, Meta(ge=1024, description="largest request line plus headers (431 above)")
    ] = 64 << 10
    header_timeout: Annotated[
        float,
        Meta(gt=0, description="seconds a request's line and headers may take to arrive (408)"),
    ] = 10.0
    body_timeout: Annotated[
        float,
        Meta(gt=0, description="seconds a request body may take, from the end of its headers"),
    ] = 60.0
    keep_alive_timeout: Annotated[
        float, Meta(gt=0, description="seconds an idle keep-alive connection stays open")
    ] = 5.0
    max_embedding_inputs: Annotated[
        int, Meta(ge=1, description="inputs in one embeddings request (OpenAI's limit: 2048)")
    ] = 2048
    max_embedding_tokens: Annotated[
        int, Meta(ge=1, description="tokens of all inputs of one embeddings request together")
    ] = 300_000
    max_connections: Annotated[
        int,
        Meta(ge=1, description="open connections per API server; more get 503 and are closed"),
    ] = 2048
    engine_heartbeat_timeout: Annotated[
        float,
        Meta(
            ge=1.0,
            description="seconds of engine silence (it sends a heartbeat every 0.5 s) before "
            "in-flight requests fail with 503 and the server reconnects",
        ),
    ] = 5.0
    log_level: Annotated[str, Meta(description="debug, info, warning or error")] = "info"
