"""The busy loop: inbox events, then one pipeline step (schedule -> execute -> sample, one step
ahead of the results, see ``engine_core.pipeline``), then emit; it blocks on the inbox only
when idle.

Runs in the engine's main thread. It never touches the socket: ``EngineIO`` decodes what API
servers send and encodes what this loop hands back. Errors that belong to one request become
that request's error output (see ``Scheduler.add`` and ``StepResult.failed``); anything that
escapes ``run`` is fatal and ``engine_core.__main__`` turns it into ENGINE_DEAD for every
client.
"""

from __future__ import annotations

import faulthandler
import logging
import queue
import time
from typing import Any, Protocol

import msgspec

from engine_core.io_thread import ClientGone, InboxEvent, IOFailed
from engine_core.pipeline import Pipeline, Runner
from engine_core.sampler import Sampler
from engine_core.scheduler import Scheduler
from ipc import messages
from ipc.config import EngineConfig

logger = logging.getLogger(__name__)

#: How long the loop waits for an event after a step it could not schedule.
STALL_WAIT_S = 1.0
#: A loop that does not come back from a step for this long gets every thread's stack
#: written to stderr (the engine's log) by faulthandler, whose own thread reads them without
#: the GIL. On the GPU host one step took about 5 s while the IO thread sent nothing either
#: (no recompile: TORCH_LOGS showed none), and the API servers failed every request in
#: flight; the stacks say where the next one is spent.
SLOW_STEP_DUMP_S = 2.5
#: The dump's timer is re-armed at most this often (arming costs ~50 us, a step a few ms), so
#: it fires after between SLOW_STEP_DUMP_S - DUMP_REARM_S and SLOW_STEP_DUMP_S in one step.
DUMP_REARM_S = 0.5


class Outbox(Protocol):
    """What the loop needs of ``EngineIO``."""

    inbox: queue.SimpleQueue[InboxEvent]

    def send(self, client: bytes | None, msg: msgspec.Struct) -> None: ...

    def set_load(self, load: messages.EngineLoad) -> None: ...


class EngineFailed(RuntimeError):
    """The engine cannot go on (raised out of ``EngineCore.run``)."""


class EngineCore:
    """One engine: a scheduler and sampler over a model runner, fed by an IO thread."""

    def __init__(self, config: EngineConfig, runner: Runner, sampler: Sampler, io: Outbox) -> None:
        self._runner = runner
        self._io = io
        self._pending: dict[bytes, list[messages.RequestOutput]] = {}
        self.scheduler = Scheduler(config, runner.facts, runner, self._collect)
        self.pipeline = Pipeline(self.scheduler, runner, sampler)
        self._armed_at: float | None = None  # when the slow-step dump was last armed

    def run(self) -> None:
        """Serve until SHUTDOWN (returns) or a fatal error (raises)."""
        try:
            self._serve()
        finally:
            self._disarm()

    def _serve(self) -> None:
        stalled = False
        while True:
            idle = not self.scheduler.has_work() and not self.pipeline.is_busy
            wait_s = STALL_WAIT_S if stalled else None if idle else 0.0
            if wait_s != 0.0:
                self._disarm()  # waiting for work is not a slow step
            for event in self._events(wait_s):
                if not self._handle(event):
                    return
            self._arm()
            stalled = not self.pipeline.advance() and self.scheduler.has_work()
            self.pipeline.stats.maybe_log(len(self.scheduler.running), len(self.scheduler.waiting))
            if stalled:
                # Nothing could be scheduled although requests wait: a bug, not a state to
                # spin in. Say so and look again when something arrives (or shortly).
                logger.error("no step could be scheduled: %s", self.scheduler.stats())
            self._flush()

    def _arm(self) -> None:
        now = time.monotonic()
        if self._armed_at is None or now - self._armed_at >= DUMP_REARM_S:
            faulthandler.dump_traceback_later(SLOW_STEP_DUMP_S)
            self._armed_at = now

    def _disarm(self) -> None:
        if self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None

    def _events(self, wait_s: float | None) -> list[InboxEvent]:
        """Everything in the inbox; first waiting up to ``wait_s`` (None: for ever) for one."""
        events = []
        if wait_s != 0.0:
            try:
                events.append(self._io.inbox.get(timeout=wait_s))
            except queue.Empty:
                return events
        while True:
            try:
                events.append(self._io.inbox.get_nowait())
            except queue.Empty:
                return events

    def _handle(self, event: InboxEvent) -> bool:
        """Apply one inbox event; False means stop serving."""
        if isinstance(event, IOFailed):
            raise EngineFailed(event.reason)
        if isinstance(event, ClientGone):
            aborted = self.scheduler.abort_client(event.client)
            if aborted:
                logger.warning(
                    "API server %r is gone; aborted its %d requests", event.client, len(aborted)
                )
            return True
        msg = event.msg
        if isinstance(msg, messages.EngineRequest):
            self.scheduler.add(msg, event.client)
        elif isinstance(msg, messages.AbortRequests):
            self.scheduler.abort(msg.request_ids)
        elif isinstance(msg, messages.Hello):
            aborted = self.scheduler.abort_client(event.client)
            if aborted:
                logger.info(
                    "client %r said HELLO again; aborted %d old requests",
                    event.client,
                    len(aborted),
                )
        elif isinstance(msg, messages.UtilityCall):
            self._io.send(event.client, self._utility(msg))
        elif isinstance(msg, messages.Shutdown):
            logger.info("shutdown requested: %s", msg.reason or "no reason given")
            return False
        return True

    def _utility(self, call: messages.UtilityCall) -> messages.UtilityResult:
        result: dict[str, Any] = {}
        try:
            if call.op == "ping":
                result = {"pong": True}
            elif call.op == "stats":
                result = self.scheduler.stats()
            elif call.op == "reset_encoder_cache":
                self._runner.reset_encoder_cache()
        except Exception as exc:  # a failed utility call is that call's answer, not a crash
            logger.exception("utility call %s failed", call.op)
            return messages.UtilityResult(call.call_id, error=repr(exc))
        return messages.UtilityResult(call.call_id, result)

    def _collect(self, client: bytes, output: messages.RequestOutput) -> None:
        self._pending.setdefault(client, []).append(output)

    def _flush(self) -> None:
        """One OutputBatch per client for this step, and the load snapshot for heartbeats."""
        load = self.scheduler.load()
        self._io.set_load(load)
        for client, outputs in self._pending.items():
            self._io.send(client, messages.OutputBatch(outputs, load))
        self._pending = {}
