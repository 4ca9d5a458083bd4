"""An even spread of connections, and of the requests on them, over the API servers.

All servers accept from one shared listening socket. Left alone, the kernel wakes every
server for each new connection, the first awake takes it (uvloop even takes a whole burst),
and a keep-alive connection then stays where it landed: NOTES.md measured 368/0/1670/138/0/0
requests over 6 servers. The rules here keep every server's open connections within one of
every other's, decided from the shared ``LoadTable`` in about a microsecond per request:

1. A server accepts only while it holds no more connections than the least loaded live
   server (``Balancer.may_accept``; ``apiserver.acceptor`` stops reading the socket
   otherwise), so new connections go to the least loaded. Among servers level with the least
   loaded, the one whose last accept is the oldest takes it: else the server that just closed
   a connection, awake and on a core, wins every race, and one client's sequential fresh
   connections all land on it.
2. A server holding two or more connections above the least loaded one answers its next
   response with ``Connection: close`` (``should_shed``): the client reconnects, and rule 1
   sends it elsewhere. The HTTP contract makes this safe: the client reads the whole response,
   then opens a new connection for its next request.
3. A server that has held one connection above the least loaded one for ``ROTATE_S`` hands
   one back, so that when connections do not divide evenly (64 over 14 servers, or fewer
   connections than servers) the extra ones rotate and every server gets its share of the
   requests over time, not only of the connections. (At once would bounce every new
   connection: rule 1 lets a server accept while it is level with the least loaded.)
4. A draining server (SIGTERM) stops accepting and closes every connection after its next
   response, so that clients move to the other servers without ever sending a request on a
   connection that the server closes under them.

Rules 2 and 3 rest while even the least loaded server holds ``CROWDED`` of
``--max-connections``: a connection sent away then reconnects behind whatever fills the
host (a flood of idle connections, say) and is refused, so established clients keep theirs.

Why connections and not in-flight requests: connections are what moves (a request cannot
change servers), closed-loop and keep-alive clients keep about one request in flight per
connection, and a count that changes only on connect and close does not flap. The price: an
idle keep-alive connection counts until it closes (``--keep-alive-timeout``), so with a few
clients a server holding one idle connection takes no new ones meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

from apiserver.load_table import DRAINING, NOT_SERVING, SERVING, STARTING, LoadTable

#: Rule 3: how long a server holds one connection above the least loaded before handing it
#: back (and so at most how often it hands one back).
ROTATE_S = 1.0
#: Rules 2 and 3 rest while the least loaded server holds this share of its connection cap.
CROWDED = 0.75

_CLOSE = (b"connection", b"close")


class Balancer:
    """This server's side of the spread: its connection count in the shared table, and the
    decisions of rules 1-4. Used on the event loop only."""

    def __init__(
        self,
        table: LoadTable,
        index: int,
        max_connections: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = table
        self._crowded = CROWDED * max_connections
        self._clock = clock
        self.index = index
        self.connections = 0
        self.state = STARTING
        #: Connections told to close whose close has not been seen yet (any close counts one
        #: off, so the figure can only err low, for a moment).
        self._closing = 0
        #: Since when this server has been one connection above the least loaded (rule 3).
        self._one_above_since: float | None = None
        self._last_accept_ns = 0
        #: Called when this server's connection count falls (the acceptor resumes reading).
        self.on_release: Callable[[], None] = _nothing
        table.publish(index, STARTING, 0)

    def start_serving(self) -> None:
        self.state = SERVING
        self._publish()

    def start_draining(self) -> None:
        self.state = DRAINING
        self._publish()

    def heartbeat(self) -> None:
        """Once a second: tell the others this server is alive, and see who is not."""
        self.table.beat(self.index)
        self.table.find_stuck()

    def may_accept(self, waited: bool = False) -> bool:
        """Rule 1: serving, and no more connections than the least loaded live server; when
        level with it, the oldest last accept among those level. A pending connection that
        has ``waited`` a recheck already may go to any server at most one above the least
        loaded: that server is slow to wake, or a flood arrives faster than one server at a
        time accepts. (Strictly least-loaded-first made every accept wait for one chosen
        loop: at 2x overload on the GPU host, up to 103 connections queued in the listening
        socket and a balancer's fresh /health connection took 712 ms at p99; 57 and 72 ms
        with this rule, same run.)"""
        if self.state != SERVING:
            return False
        least = self.table.least_connections()
        if waited:
            return self.connections <= least + 1
        if self.connections != least:
            return self.connections < least
        return self._last_accept_ns <= self.table.oldest_accept(least)

    def connection_opened(self) -> None:
        self.connections += 1
        self._one_above_since = None  # a new imbalance: rule 3's wait starts again
        self._last_accept_ns = time.monotonic_ns()
        self.table.publish_accept(self.index, self._last_accept_ns)
        self._publish()

    def connection_closed(self) -> None:
        self.connections -= 1
        self._one_above_since = None
        self._closing = max(0, self._closing - 1)
        self._publish()
        self.on_release()

    def should_shed(self) -> bool:
        """Whether the request that just arrived should close its connection after its
        response (rules 2-4); a yes counts that connection as closing."""
        if self.state != SERVING:
            return self.state == DRAINING
        least = self.table.least_connections()
        excess = self.connections - self._closing - least
        if excess <= 0 or least == NOT_SERVING:
            self._one_above_since = None
            return False
        if least >= self._crowded:
            return False
        now = self._clock()
        if excess == 1:
            if self._one_above_since is None:
                self._one_above_since = now
            if now - self._one_above_since < ROTATE_S:
                return False
        self._closing += 1
        self._one_above_since = now
        return True

    def _publish(self) -> None:
        self.table.publish(self.index, self.state, self.connections)


def _nothing() -> None:
    pass


Scope = MutableMapping[str, Any]


class ShedMiddleware:
    """Pure ASGI: adds ``Connection: close`` to a request's response when the balancer says
    its connection should go to another server (uvicorn then closes it once the response is
    sent). Outermost, so that every request counts, errors included; decided as the request
    arrives, so that the common answer (keep it) costs no wrapper around ``send``."""

    def __init__(self, app: Any, balancer: Balancer) -> None:
        self._app = app
        self._balancer = balancer

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self._balancer.should_shed():
            await self._app(scope, receive, send)
            return

        async def send_closing(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if _CLOSE not in headers:
                    headers.append(_CLOSE)
                message["headers"] = headers
            await send(message)

        await self._app(scope, receive, send_closing)
