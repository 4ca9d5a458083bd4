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

import logging
import queue
from typing import Any, Protocol

import msgspec

from engine_core.io_thread import ClientGone, InboxEvent, IOFailed
from engine_core.pipeline import Pipeline, Runner
from engine_core.sampler import Sampler
from engine_core.scheduler import Scheduler
from engine_core.step_watch import StepWatch
from ipc import messages
from ipc.config import EngineConfig

logger = logging.getLogger(__name__)

#: How long the loop waits for an event after a step it could not schedule.
STALL_WAIT_S = 1.0


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
        self.watch = StepWatch()

    def run(self) -> None:
        """Serve until SHUTDOWN (returns) or a fatal error (raises)."""
        self.watch.start()
        try:
            self._serve()
        finally:
            self.watch.stop()

    def _serve(self) -> None:
        stalled = False
        while True:
            idle = not self.scheduler.has_work() and not self.pipeline.is_busy
            wait_s = STALL_WAIT_S if stalled else None if idle else 0.0
            if wait_s != 0.0:
                self.watch.idle()  # waiting for work is not a slow step
            for event in self._events(wait_s):
                if not self._handle(event):
                    return
            self.watch.begin()
            stalled = not self.pipeline.advance() and self.scheduler.has_work()
            self.pipeline.stats.maybe_log(len(self.scheduler.running), len(self.scheduler.waiting))
            if stalled:
                # Nothing could be scheduled although requests wait: a bug, not a state to
                # spin in. Say so and look again when something arrives (or shortly).
                logger.error("no step could be scheduled: %s", self.scheduler.stats())
            self._flush()

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
