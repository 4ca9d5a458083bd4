"""`fanin serve`: bind the socket, start the engine core, fork N API servers, supervise them.

Order matters: the listening socket is bound first so that a port in use fails in
milliseconds rather than after a model load; the engine must answer READY before any API
server starts, so that servers never serve 503s during a cold start. Every exit path ends
with no child left (children also ask for PDEATHSIG, which covers a SIGKILLed launcher) and
the run dir removed (after a SIGKILL, by the next launcher: see ``run_dir``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import msgspec

from apiserver.config import ServerConfig
from apiserver.cpu_budget import CpuShare, thread_environment
from apiserver.launch.listener import describe_listener, remove_uds
from apiserver.launch.preload import freeze_heap, native_threads, preload
from apiserver.launch.run_dir import RunDir, engine_address, remove_stale_run_dirs
from apiserver.launch.supervisor import Child, Events, fork, respawn_delay, spawn
from apiserver.launch.systemd import notify, watchdog_interval
from apiserver.load_table import LoadTable
from ipc.config import EngineConfig

logger = logging.getLogger("fanin.launcher")

#: How long API servers get to answer in-flight requests with 503 after the engine died.
ENGINE_DEATH_GRACE_S = 2.5
#: Extra time over shutdown_timeout before stragglers are SIGKILLed.
KILL_GRACE_S = 5.0
#: How long the engine gets to exit after SIGTERM.
ENGINE_STOP_TIMEOUT_S = 10.0
#: A server that dies before it is ready, or this soon after start, is crash-looping.
FAST_FAILURE_S = 1.0
#: How many times one API server killed by a signal during start-up is started again before
#: `fanin serve` gives up. A signal (SIGSEGV, the OOM killer's SIGKILL) is the mark of a
#: crash that may not come back: on the GPU host one of 14 servers died of SIGSEGV at start
#: once, and the whole start failed with it. A server that exits with a status instead met
#: an error it will meet again (its tokenizer does not load): that fails the start at once.
STARTUP_CRASH_RETRIES = 2


class Launcher:
    """Owns every child process of one `fanin serve`. ``run()`` returns the exit code."""

    def __init__(
        self, server: ServerConfig, engine: EngineConfig, share: CpuShare, model: str
    ) -> None:
        """``share``: ``cpu_budget.plan`` of ``server`` on this machine; ``model``: the
        resolved model directory."""
        self.model = model
        # The servers get the plan's resolved figures, so that all of them agree on N.
        self.server_cfg = msgspec.structs.replace(
            server,
            api_server_count=share.api_server_count,
            renderer_num_workers=share.render_workers,
            api_server_threads=share.threads,
            engine_cpu_cores=share.engine_cores,
        )
        self.share = share
        self.engine_cfg = engine
        self.engine: Child | None = None
        self.servers: dict[int, Child] = {}
        self._fast_failures: dict[int, int] = {}
        self._respawn_at: dict[int, float] = {}
        self._watchdog_interval = watchdog_interval()
        self._next_watchdog = 0.0

    def run(self, listener: socket.socket) -> int:
        """Serve on ``listener`` (from ``bind_listener``; closed on return) until SIGTERM/SIGINT
        (exit 0) or until the engine dies (exit 1)."""
        logger.info("listening on %s", describe_listener(listener, self.server_cfg))
        self._log_share()
        try:
            remove_stale_run_dirs()
            run_dir = RunDir()
        except BaseException:
            listener.close()
            raise
        logger.info("run dir %s", run_dir.path)
        self.load_table: LoadTable | None = None
        try:
            self._write_configs(run_dir.path)
            self.listen_fd = listener.fileno()
            with Events() as events:
                self.events = events
                code = self._serve(listener.close)
            logger.info("stopped (exit code %d)", code)
            return code
        finally:
            self._kill_all()
            listener.close()
            remove_uds(self.server_cfg)
            if self.load_table is not None:
                self.load_table.close()
            run_dir.remove()

    def _log_share(self) -> None:
        logger.info("cpu budget: %s", self.share.describe())
        for note in self.share.notes:
            logger.warning("%s", note)
        _, kept = thread_environment(self.share.threads, os.environ)
        for name, value in kept.items():
            logger.warning("%s=%s is set in the environment: API servers keep it", name, value)

    def _write_configs(self, run_dir: str) -> None:
        self.engine_address = engine_address(run_dir)
        self.metrics_dir = os.path.join(run_dir, "metrics")
        os.mkdir(self.metrics_dir, 0o700)
        # Before anything here imports prometheus_client: it picks its multiprocess mode at
        # import, and the API servers forked from here inherit that module.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        for name, cfg in (("engine.json", self.engine_cfg), ("server.json", self.server_cfg)):
            # 0600: server.json may hold the API key (the run dir is 0700 too).
            path = os.path.join(run_dir, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(msgspec.json.encode(cfg))
        self.run_dir = run_dir
        self.load_table_path = os.path.join(run_dir, "load.table")
        self.load_table = LoadTable.create(self.load_table_path, self.share.api_server_count)

    def _serve(self, close_listener: Callable[[], None]) -> int:
        engine_cmd = [sys.executable, "-m", "engine_core", "--config"]
        engine_cmd += [f"{self.run_dir}/engine.json", "--model", self.model]
        engine_cmd += ["--engine-address", self.engine_address, "--ready-fd", "{ready_fd}"]
        engine_cmd += ["--parent-pid", str(os.getpid())]
        # The engine's own CPU work (input staging, pinned copies) runs in torch's thread pool
        # too: left at a thread per core, its spinning OpenMP workers took 10 of 16 cores from
        # the API servers on the GPU host. It gets the cores the budget keeps for it.
        updates, _ = thread_environment(max(1, self.share.engine_cores), os.environ)
        self.engine = spawn(
            "engine core", engine_cmd, env={**os.environ, **updates}, with_ready_pipe=True
        )
        self.events.watch(self.engine)
        logger.info("engine core started (pid %d)", self.engine.pid)
        # The API servers' imports, once for all of them, overlap the engine's start; their
        # HELLOs then wait in ZeroMQ's queue until the engine binds (they wait for READY as
        # long as the launcher waits for the engine).
        seconds = preload()
        frozen = freeze_heap()
        threads = native_threads()
        logger.log(
            logging.INFO if len(threads) == 1 else logging.WARNING,
            "imported the API servers' libraries in %.1f s, %d objects frozen out of the "
            "garbage collector's reach (the launcher has %d thread(s): %s)",
            seconds,
            frozen,
            len(threads),
            ", ".join(threads),
        )
        for index in range(self.share.api_server_count):
            self._spawn_server(index)
        code = self._wait_started()
        if code is not None:
            return self._stop(code)
        status = f"{len(self.servers)} API server(s), engine core pid {self.engine.pid}"
        notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS=serving: {status}")
        logger.info("ready: %s", status)
        return self._supervise(close_listener)

    def _wait(self, deadline: float | None) -> list[tuple[str, object]]:
        """``Events.wait``, feeding systemd's watchdog on the way. Fed from this one loop, so
        that a launcher stuck anywhere stops feeding it and systemd restarts the unit."""
        if self._watchdog_interval is None:
            return self.events.wait(deadline)
        while True:
            now = time.monotonic()
            if now >= self._next_watchdog:
                notify("WATCHDOG=1")
                self._next_watchdog = now + self._watchdog_interval
            wake = self._next_watchdog if deadline is None else min(deadline, self._next_watchdog)
            events = self.events.wait(wake)
            if events or (deadline is not None and time.monotonic() >= deadline):
                return events

    # -- startup ---------------------------------------------------------------------------

    def _wait_started(self) -> int | None:
        """The engine's ready byte within ``engine_ready_timeout``, then every server's,
        watching every process and signals. None when all are ready, else the exit code to
        stop with (after logging why)."""
        engine = self.engine
        assert engine is not None
        timeout = self.server_cfg.engine_ready_timeout
        deadline = time.monotonic() + timeout
        crashes: dict[int, int] = {}
        while not all(c.is_ready for c in (engine, *self.servers.values())):
            events = self._wait(None if engine.is_ready else deadline)
            if not events:
                logger.error("engine core not ready within %g s (engine_ready_timeout)", timeout)
                return 1
            for tag, obj in events:
                if tag == "signal":
                    logger.info("%s during startup: stopping", _signal_name(obj))
                    return 0
                if tag == "exit":
                    assert isinstance(obj, Child)
                    code = obj.exit_code
                    if obj is not engine and code is not None and code < 0:
                        index = self._forget(obj)
                        crashes[index] = crashes.get(index, 0) + 1
                        if crashes[index] <= STARTUP_CRASH_RETRIES:
                            logger.error(
                                "%s (pid %d) was killed by %s during startup; starting it again",
                                obj.name,
                                obj.pid,
                                _signal_name(-code),
                            )
                            self._spawn_server(index)
                            continue
                    logger.error("%s exited with code %s during startup", obj.name, code)
                    return 1
                if tag == "ready" and obj is engine:
                    logger.info("engine core ready")
        return None

    def _spawn_server(self, index: int) -> None:
        argv = ["--config", f"{self.run_dir}/server.json", "--index", str(index)]
        argv += ["--listen-fd", str(self.listen_fd), "--engine-address", self.engine_address]
        argv += ["--metrics-dir", self.metrics_dir, "--load-table", self.load_table_path]
        argv += ["--parent-pid", str(os.getpid())]
        child = fork(
            f"api server {index}",
            lambda ready_fd: _run_server([*argv, "--ready-fd", str(ready_fd)]),
            self._release_in_child,
        )
        self.servers[index] = child
        self.events.watch(child)
        logger.info("api server %d started (pid %d)", index, child.pid)

    def _release_in_child(self) -> None:
        """In a forked API server: close the launcher's selector, wakeup socket and the
        pidfds and ready pipes of its other children."""
        self.events.close_in_child()
        for child in (self.engine, *self.servers.values()):
            if child is not None and child.is_alive:
                os.close(child.pidfd)
                if child.ready_fd is not None:
                    os.close(child.ready_fd)

    # -- steady state ----------------------------------------------------------------------

    def _supervise(self, close_listener: Callable[[], None]) -> int:
        while True:
            deadline = min(self._respawn_at.values(), default=None)
            events = self._wait(deadline)
            for tag, obj in events:
                if tag == "signal":
                    notify("STOPPING=1", f"STATUS=draining ({_signal_name(obj)})")
                    logger.info("%s: draining", _signal_name(obj))
                    close_listener()  # the servers stop accepting on their own SIGTERM
                    return self._stop(0)
                if tag == "exit" and isinstance(obj, Child) and obj is self.engine:
                    logger.error("engine core died (exit code %s)", obj.exit_code)
                    notify("STOPPING=1", "STATUS=engine core died")
                    self._let_servers_fail_requests()
                    return self._stop(1)
                if tag == "exit":
                    assert isinstance(obj, Child)
                    self._schedule_respawn(obj)
                if tag == "ready":
                    assert isinstance(obj, Child)
                    logger.info("%s ready (pid %d)", obj.name, obj.pid)
            now = time.monotonic()
            for index, due in list(self._respawn_at.items()):
                if due <= now:
                    del self._respawn_at[index]
                    self._spawn_server(index)

    def _forget(self, child: Child) -> int:
        """Clear what a dead API server leaves (its load-table row, its metrics files);
        returns its index."""
        index = next(i for i, c in self.servers.items() if c is child)
        assert self.load_table is not None
        self.load_table.clear(index)  # its connections died with it
        from prometheus_client import multiprocess  # after PROMETHEUS_MULTIPROC_DIR is set

        try:
            multiprocess.mark_process_dead(child.pid, self.metrics_dir)
        except OSError as e:
            logger.warning("could not clean metrics of pid %d: %s", child.pid, e)
        return index

    def _schedule_respawn(self, child: Child) -> None:
        index = self._forget(child)
        crashed_early = not child.is_ready or time.monotonic() - child.started < FAST_FAILURE_S
        failures = self._fast_failures.get(index, 0) + 1 if crashed_early else 0
        self._fast_failures[index] = failures
        delay = respawn_delay(failures)
        logger.warning(
            "%s (pid %d) exited with code %s; respawning in %.2g s",
            child.name,
            child.pid,
            child.exit_code,
            delay,
        )
        self._respawn_at[index] = time.monotonic() + delay

    def _let_servers_fail_requests(self) -> None:
        """The servers see the engine's death themselves and answer 503; give them a moment
        before they are stopped. A signal cuts the wait short."""
        deadline = time.monotonic() + ENGINE_DEATH_GRACE_S
        while time.monotonic() < deadline:
            if any(tag == "signal" for tag, _ in self._wait(deadline)):
                return

    # -- shutdown --------------------------------------------------------------------------

    def _stop(self, code: int) -> int:
        """SIGTERM the API servers, let them drain, then stop the engine. A second SIGINT or
        SIGTERM kills everything at once."""
        self._respawn_at.clear()
        cfg = self.server_cfg
        grace = cfg.shutdown_delay + cfg.shutdown_timeout + KILL_GRACE_S
        if not self._terminate([c for c in self.servers.values() if c.is_alive], grace):
            return 1
        engine = self.engine
        if engine and engine.is_alive and not self._terminate([engine], ENGINE_STOP_TIMEOUT_S):
            return 1
        return code

    def _terminate(self, children: list[Child], timeout: float) -> bool:
        """SIGTERM ``children`` and wait for them, SIGKILL after ``timeout``. False when a
        second signal asked for an immediate exit (``run`` then kills everything)."""
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.is_alive for c in children):
            events = self._wait(deadline)
            if not events:
                for child in children:
                    if child.is_alive:
                        logger.warning("%s did not stop in %g s: killing it", child.name, timeout)
                        child.signal(signal.SIGKILL)
                deadline = time.monotonic() + timeout
            if any(tag == "signal" for tag, _ in events):
                logger.warning("second signal: exiting now")
                return False
        return True

    def _kill_all(self) -> None:
        children = [c for c in (self.engine, *self.servers.values()) if c is not None]
        for child in children:
            if child.is_alive:
                child.signal(signal.SIGKILL)
                child.reap()


def _run_server(argv: list[str]) -> int:
    """An API server's ``main``, in a child forked from the launcher."""
    from apiserver.server import main

    try:
        return main(argv)
    finally:
        logging.shutdown()


def _signal_name(signum: object) -> str:
    return signal.Signals(signum).name if isinstance(signum, int) else str(signum)
