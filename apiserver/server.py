"""Process entry of one API server:

``python -m apiserver.server --config PATH --index I --listen-fd FD --engine-address ADDR
[--metrics-dir DIR] [--load-table PATH] [--ready-fd FD] [--parent-pid PID]``

``--config`` holds the user's settings (ServerConfig JSON); the rest is the launcher's wiring.
Reads the config, sizes its threads to its share of the cores (before torch is
imported: ``apiserver.cpu_budget``), connects to the engine (HELLO/READY), loads the model's
tokenizer and processor, then serves the inherited listening socket with uvicorn (uvloop +
httptools behind ``apiserver.http_guard``), accepting through ``apiserver.acceptor`` so that
connections spread evenly over the servers that share ``--load-table``, and writes one byte to
``--ready-fd`` once it accepts.

SIGTERM (or SIGHUP, SIGINT): for ``shutdown_delay`` seconds it goes on serving with /ready at
503 (a load balancer takes the host out of rotation); then it stops accepting, closes each
connection after its next response for up to ``DRAIN_SHED_S`` (clients move to the other
servers), and uvicorn lets in-flight requests finish for ``shutdown_timeout`` seconds; the
lifespan shutdown then aborts whatever is left in the engine; exit status 0. Exit status 1:
the engine client cannot go on (the engine was replaced, or its socket failed); 2: a bad
configuration; 3: the event loop was stuck (``apiserver.watchdog``). The launcher respawns the
server whatever the status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import msgspec
import uvicorn
import uvloop

from apiserver import cpu_budget
from apiserver.acceptor import Acceptor, counted_protocol
from apiserver.config import ServerConfig
from apiserver.launch.preload import freeze_heap
from apiserver.load_table import LoadTable
from apiserver.spread import Balancer, ShedMiddleware
from ipc.lifecycle import die_with_parent, name_process, signal_ready

if TYPE_CHECKING:  # imported for real in _serve, after PROMETHEUS_MULTIPROC_DIR is set
    from apiserver.context import ServerContext
    from apiserver.render_workers import RenderWorkers

log = logging.getLogger("apiserver")

_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: File descriptors besides client connections: ZeroMQ, pipes, model and media files.
FD_HEADROOM = 256
#: On SIGTERM, how long connections get to close after their next response before uvicorn
#: closes the idle ones (capped by ``shutdown_timeout``).
DRAIN_SHED_S = 2.0


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="apiserver.server", description=__doc__)
    p.add_argument("--config", required=True, help="ServerConfig JSON file")
    p.add_argument("--index", type=int, required=True, help="this server's client index")
    p.add_argument("--listen-fd", type=int, required=True, help="inherited listening socket")
    p.add_argument("--engine-address", required=True, help="the engine's ZeroMQ address")
    p.add_argument("--metrics-dir", help="Prometheus multiprocess directory of all servers")
    p.add_argument("--load-table", help="the launcher's load table (see apiserver.load_table)")
    p.add_argument("--ready-fd", type=int, help="write one byte here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process dies")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one API server until SIGTERM; returns the exit status."""
    args = _parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    name_process(f"fanin-api-server-{args.index}")
    try:
        config = msgspec.json.decode(Path(args.config).read_bytes(), type=ServerConfig)
    except (OSError, msgspec.DecodeError) as exc:
        print(f"apiserver: bad --config {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.metrics_dir:
        # prometheus_client picks its multiprocess mode when first imported (via apiserver.app).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = args.metrics_dir
    logging.basicConfig(
        force=True,  # forked from the launcher: its handlers and format are inherited
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s api-server-{args.index} %(name)s: %(message)s",
    )
    _raise_fd_limit(config.max_connections + FD_HEADROOM)
    try:
        share = _size_threads(config)
        table, row = _load_table(args.load_table, args.index, share.api_server_count)
    except (cpu_budget.BudgetError, OSError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    workers = None
    if config.preprocess_mode == "process":  # forked now: no thread of this server runs yet
        from apiserver.render_workers import RenderWorkers

        inherited = [args.listen_fd] + ([] if args.ready_fd is None else [args.ready_fd])
        workers = RenderWorkers.fork(
            share.render_workers, config, f"fanin-render-{args.index}", inherited
        )
    sock = socket.socket(fileno=args.listen_fd)
    try:
        return uvloop.run(
            _serve(
                config,
                args.index,
                args.engine_address,
                sock,
                args.ready_fd,
                share,
                Balancer(table, row, config.max_connections),
                workers,
            )
        )
    except (TimeoutError, ConnectionError, OSError) as exc:
        # No engine, an incompatible one, or no tokenizer at READY's model path.
        log.error("cannot start: %s", exc)
        return 1
    finally:
        from apiserver import metrics

        metrics.mark_dead(os.getpid())


def _raise_fd_limit(wanted: int) -> None:
    """Past the fd limit, accept() fails and connections are reset instead of shed with a
    503 (``http_guard``): raise the soft limit toward the hard one, as vLLM does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        log.warning(
            "open-file limit %d is below --max-connections plus %d; raise it (LimitNOFILE=)",
            new,
            FD_HEADROOM,
        )


def _size_threads(config: ServerConfig) -> cpu_budget.CpuShare:
    """This server's share of the cores, applied to the math libraries before torch loads.
    The launcher already logged its plan and corrections."""
    share = cpu_budget.plan(config, cpu_budget.usable_cores())
    kept = cpu_budget.apply_environment(share, os.environ)
    cpu_budget.apply_torch_threads(share)
    # The event loop shares the GIL with the render threads: each of its callbacks (accept,
    # read, write) waits up to one switch interval for a render thread in Python to let go.
    sys.setswitchinterval(config.gil_switch_interval / 1000)
    log.info(
        "%d render worker(s), %d math thread(s), GIL switch interval %g ms%s",
        share.render_workers,
        share.threads,
        config.gil_switch_interval,
        "".join(f"; {k}={v} kept from the environment" for k, v in kept.items()),
    )
    return share


def _load_table(path: str | None, index: int, rows: int) -> tuple[LoadTable, int]:
    """The shared table and this server's row in it; a private one-row table without a
    launcher."""
    if path is None:
        return LoadTable.private(), 0
    if not 0 <= index < rows:
        raise OSError(f"--index {index} has no row in a load table of {rows}")
    return LoadTable.open(path, rows), index


async def _serve(
    config: ServerConfig,
    index: int,
    engine_address: str,
    sock: socket.socket,
    ready_fd: int | None,
    share: cpu_budget.CpuShare,
    balancer: Balancer,
    workers: RenderWorkers | None,
) -> int:
    """Serve until SIGTERM (0) or until the engine client cannot go on (1)."""
    # Imported here: they import prometheus_client, which must see PROMETHEUS_MULTIPROC_DIR.
    from apiserver.admission import Admission
    from apiserver.app import build_app
    from apiserver.context import ServerContext
    from apiserver.engine_client import EngineClient
    from apiserver.http_guard import HttpLimits, guarded_protocol
    from apiserver.media import MediaFetcher
    from apiserver.renderer import Renderer

    fatal: list[str] = []
    server: _ReadyServer | None = None

    def on_fatal(reason: str) -> None:
        log.error("cannot go on: %s; exiting (the launcher starts a new server)", reason)
        fatal.append(reason)
        if server is not None:
            server.should_exit = True

    client = EngineClient(engine_address, index, config.engine_heartbeat_timeout, on_fatal=on_fatal)
    try:
        ready = await client.start(config.engine_ready_timeout)
        if workers is not None and not ready.supports_images:
            workers.close()  # they would render nothing: every chat is text
            workers = None
        if workers is not None:
            await workers.start(ready, on_fatal)
        renderer = await asyncio.to_thread(
            Renderer.load, ready.model, ready, config, share.render_workers, workers
        )
    except BaseException:
        if workers is not None:
            workers.close()
        await client.close()
        raise
    # Start-up over: what lives now lives as long as the server (see ``freeze_heap``).
    log.info("%d objects frozen out of the garbage collector's reach", freeze_heap())
    name = config.served_model_name or os.path.basename(os.path.normpath(ready.model))
    admission = Admission(
        config,
        lambda: client.load_snapshot,
        lambda: client.num_streams,
        renderer,
        balancer.table,
        balancer.index,
    )
    ctx = ServerContext(
        config, index, name, ready, client, renderer, MediaFetcher(config), admission
    )
    uv_config = uvicorn.Config(
        ShedMiddleware(build_app(ctx), balancer),
        loop="none",
        http=guarded_protocol(HttpLimits.from_config(config)),
        ws="none",
        timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]  # a float works
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=config.log_level,
        # uvicorn annotates int, but hands it to asyncio.wait_for: fractions of seconds work.
        timeout_graceful_shutdown=config.shutdown_timeout,  # type: ignore[arg-type]
    )
    server = _ReadyServer(uv_config, ready_fd, ctx, sock, balancer)
    server.should_exit = bool(fatal)
    await server.serve(sockets=[])
    return 1 if fatal else 0


class _ReadyServer(uvicorn.Server):
    """uvicorn's Server accepting through an ``Acceptor``, telling the launcher once it does,
    and draining in two phases on SIGTERM: first ``shutdown_delay`` seconds of serving with
    /ready at 503 (a load balancer takes the host out of rotation meanwhile), then the
    acceptor's drain and uvicorn's own graceful stop."""

    def __init__(
        self,
        config: uvicorn.Config,
        ready_fd: int | None,
        ctx: ServerContext,
        listener: socket.socket,
        balancer: Balancer,
    ) -> None:
        super().__init__(config)
        self._ready_fd = ready_fd
        self._ctx = ctx
        self._listener = listener
        self._balancer = balancer
        self._acceptor: Acceptor | None = None
        self._stop_accepting_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        delay = self._ctx.config.shutdown_delay
        if self._ctx.draining or delay <= 0:  # a second signal, or no delay: uvicorn's stop
            super().handle_exit(sig, frame)
            return
        self._ctx.draining = True
        self._stop_accepting_at = time.monotonic() + delay
        log.info("draining: /ready answers 503; accepting for %g s more", delay)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises SIGTERM after the graceful drain (so the process
        # dies by the signal); a drained API server exits 0 instead.
        handlers = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # No sockets for uvicorn: it runs the lifespan and leaves accepting to the Acceptor.
        await super().startup(sockets=[])
        if not self.started:
            return
        factory = counted_protocol(self.config, self, self._balancer)
        self._acceptor = Acceptor(self._listener, factory, self._balancer)
        self._acceptor.start()
        self.servers.append(self._acceptor)  # type: ignore[arg-type]  # closed by shutdown
        signal_ready(self._ready_fd)
        self._ready_fd = None

    async def on_tick(self, counter: int) -> bool:
        # uvicorn ticks ten times a second: beat on its once-a-second tick, and publish the
        # pending requests on every one; no timer of ours.
        if counter % 10 == 0:
            self._balancer.heartbeat()
        self._ctx.admission.refresh()
        if self._stop_accepting_at is not None and time.monotonic() >= self._stop_accepting_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._acceptor is not None:
            grace = self.config.timeout_graceful_shutdown or 0
            await self._acceptor.drain(min(DRAIN_SHED_S, grace))
        await super().shutdown(sockets=sockets)


if __name__ == "__main__":
    status = main()
    # Past this point only the interpreter's teardown is left: seconds of garbage collection
    # over torch and transformers, which the launcher's replacement for this server would
    # wait out (8 s measured on the 2-core CI machine). Sockets and pools are closed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
