"""Accepting connections from the shared listening socket under the spread's rule 1
(``apiserver.spread``), in place of uvicorn's own accept loop.

uvicorn would hand the socket to ``loop.create_server``, whose accept loop cannot be paused
and takes every pending connection at once. Here the socket is read only while this server
may take a connection; one is accepted at a time and handed to uvicorn's HTTP protocol with
``loop.connect_accepted_socket``. While the rule says no, the socket is left alone (it stays
readable for the server that may take it) and looked at again every ``RECHECK_S``, or as
soon as this server closes a connection. ``Acceptor`` stands in for the ``asyncio.Server``
that uvicorn closes and awaits at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from apiserver.eager import start_task
from apiserver.spread import Balancer

log = logging.getLogger(__name__)

#: While another server should take the pending connections: how soon to look again. A bound
#: on how long a connection waits when the least loaded server is slow to wake.
RECHECK_S = 0.005
#: A connection still pending this soon after a deferral is the one deferred (or a flood's).
WAITED_S = 4 * RECHECK_S
#: After the process ran out of file descriptors or memory for one more connection (asyncio
#: waits the same before accepting again).
RESOURCE_RETRY_S = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def counted_protocol(
    config: uvicorn.Config, server: uvicorn.Server, balancer: Balancer
) -> Callable[[], asyncio.Protocol]:
    """uvicorn's HTTP protocol factory (as its ``Server.startup`` builds it), with every closed
    connection reported to ``balancer``."""
    base: type[asyncio.Protocol] = config.http_protocol_class

    def connection_lost(self: asyncio.Protocol, exc: Exception | None) -> None:
        base.connection_lost(self, exc)
        balancer.connection_closed()

    counted = type(f"Counted{base.__name__}", (base,), {"connection_lost": connection_lost})
    return functools.partial(
        counted, config=config, server_state=server.server_state, app_state=server.lifespan.state
    )


class Acceptor:
    """Accepts from ``listener`` (shared with the other servers) while ``balancer`` allows."""

    def __init__(
        self,
        listener: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        balancer: Balancer,
    ) -> None:
        self._listener = listener
        self._factory = protocol_factory
        self._balancer = balancer
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False
        self._deferred_at: float | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[Any]] = set()
        self._drained = asyncio.Event()
        balancer.on_release = self._on_release

    def start(self) -> None:
        """Start accepting; the balancer then counts this server in."""
        self._listener.setblocking(False)
        self._balancer.start_serving()
        self._read()

    def close(self) -> None:
        """Stop accepting for good (idempotent); open connections stay."""
        if self._closed:
            return
        self._closed = True
        self._balancer.start_draining()
        self._unread()
        if self._retry is not None:
            self._retry.cancel()
        self._listener.close()

    async def wait_closed(self) -> None:
        """For uvicorn's shutdown: nothing outlives ``close`` here."""

    async def drain(self, timeout: float) -> None:
        """Stop accepting, then give open connections up to ``timeout`` seconds to close after
        their next response (rule 4), so that clients move on cleanly; uvicorn's shutdown
        closes what is left."""
        self.close()
        if self._balancer.connections > 0 and timeout > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)

    def _read(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._listener.fileno(), self._on_readable)
            self._reading = True

    def _unread(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._listener.fileno())
            self._reading = False

    def _on_readable(self) -> None:
        # Still readable a recheck after this server deferred to another: the connection
        # has waited, and a tie no longer holds it back (``Balancer.may_accept``).
        now = self._loop.time()
        waited = self._deferred_at is not None and now - self._deferred_at <= WAITED_S
        while self._balancer.may_accept(waited):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another server took it
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.error("cannot accept: %s; retrying in %g s", exc, RESOURCE_RETRY_S)
                    self._pause(RESOURCE_RETRY_S)
                    return
                continue  # the client gave up before we took it (ECONNABORTED and the like)
            self._serve(conn)
            waited = False
        self._deferred_at = now
        self._pause(RECHECK_S)

    def _pause(self, delay: float) -> None:
        self._unread()
        if self._retry is None and not self._closed:
            self._retry = self._loop.call_later(delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._read()

    def _on_release(self) -> None:
        """A connection of ours closed: we may be the least loaded again."""
        if self._closed:
            if self._balancer.connections == 0:
                self._drained.set()
            return
        if not self._reading and self._retry is not None:
            self._retry.cancel()
            self._resume()

    def _serve(self, conn: socket.socket) -> None:
        self._balancer.connection_opened()
        # Eager: the transport exists (and reads) from this iteration on, not the next one.
        task = start_task(self._loop, self._loop.connect_accepted_socket(self._factory, conn))
        self._connecting.add(task)
        task.add_done_callback(functools.partial(self._connected, conn))

    def _connected(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if task.cancelled() or task.exception() is not None:
            # The protocol never saw the connection, so it will not report the close.
            conn.close()
            self._balancer.connection_closed()
