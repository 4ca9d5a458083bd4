"""How many event-loop iterations a request waits between its accept and its answer
(``apiserver.eager``), counted on a real loopback socket with uvloop, the real acceptor and
the guarded protocol: a GET whose bytes are in the socket before the server accepts it, and a
handler that answers without waiting. Under load every iteration is long (each runs many
callbacks), so this count, not a callback's length, is what a health check's latency scales
with."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

import uvloop

from apiserver.acceptor import Acceptor
from apiserver.http_guard import HttpLimits
from bench.loop_hops import serve_accepting

LIMITS = HttpLimits(
    max_header_bytes=8192, header_timeout_s=30, body_timeout_s=30, max_connections=8
)
#: Eager tasks (Python 3.12+): the connection's set-up runs in the accept's own iteration and
#: the handler inside the read of the head, one iteration later. Before 3.12 each of those two
#: waits one iteration more.
EXPECTED = 1 if sys.version_info >= (3, 12) else 3


def test_a_waiting_request_is_answered_in_the_iteration_after_its_accept() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2], timeout=10)
    client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # waiting before the accept
    marks: dict[str, int] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        iteration = 0
        answered = asyncio.Event()

        def tick() -> None:  # runs once per iteration of the loop
            nonlocal iteration
            iteration += 1
            if not answered.is_set():
                loop.call_soon(tick)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            marks["answered"] = iteration
            answered.set()

        class Noted(Acceptor):
            def _serve(self, conn: socket.socket) -> None:
                marks["accepted"] = iteration
                super()._serve(conn)

        tick()
        acceptor, state = serve_accepting(listener, app, LIMITS, Noted)
        await asyncio.wait_for(answered.wait(), 10)
        acceptor.close()
        for protocol in list(state.connections):
            protocol.transport.close()
        await asyncio.sleep(0.01)  # the transport's close completes

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        reply = client.recv(4096)
        client.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert marks["answered"] - marks["accepted"] == EXPECTED, marks
