"""A test's stand-in for one API server: a DEALER on the engine socket, through ipc.transport."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import zmq

from ipc import messages, transport
from ipc.codec import Decoder, Encoder


class Client:
    """One API server's DEALER. ``poll_ms`` bounds every wait for a message."""

    def __init__(
        self, ctx: zmq.Context[Any], address: str, index: int, poll_ms: int = 60_000
    ) -> None:
        self.sock = transport.connect_client_socket(ctx, address, index)
        self.encoder, self.decoder = Encoder(), Decoder(messages.FROM_ENGINE)
        self.index = index
        self.poll_ms = poll_ms
        self.call_id = 0

    def hello(self, timeout_s: float = 120.0) -> messages.Ready:
        hello = messages.Hello(client_index=self.index, pid=os.getpid())
        return transport.handshake(self.sock, self.encoder, self.decoder, hello, timeout_s)

    def send(self, msg: Any) -> None:
        transport.send(self.sock, self.encoder, msg)

    def recv(self) -> Any:
        assert self.sock.poll(self.poll_ms), "no message from the engine"
        return transport.recv(self.sock, self.decoder)

    def utility(self, op: str) -> dict[str, Any]:
        self.call_id += 1
        self.send(messages.UtilityCall(self.call_id, op))  # type: ignore[arg-type]
        while True:
            msg = self.recv()
            if isinstance(msg, messages.UtilityResult) and msg.call_id == self.call_id:
                assert msg.error is None
                return msg.result

    def wait_stats(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Poll the stats utility (each call a round trip, no sleeps) until ``predicate``."""
        for _ in range(20_000):
            stats = self.utility("stats")
            if predicate(stats):
                return stats
        raise AssertionError(f"engine stats never matched; last {stats}")

    def collect(self, request_ids: set[str]) -> dict[str, list[messages.RequestOutput]]:
        """Outputs until every id in ``request_ids`` finished."""
        got: dict[str, list[messages.RequestOutput]] = {}
        open_ids = set(request_ids)
        while open_ids:
            msg = self.recv()
            assert not isinstance(msg, messages.EngineDead), msg.reason
            if isinstance(msg, messages.OutputBatch):
                for out in msg.outputs:
                    got.setdefault(out.request_id, []).append(out)
                    if out.finish_reason is not None:
                        open_ids.discard(out.request_id)
        return got

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)
