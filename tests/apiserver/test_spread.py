"""The spread's building blocks in-process: the shared load table (a real file mapping, read
back through a second mapping as another server would), the balancer's rules, the
``Connection: close`` middleware, and the acceptor on a real listening socket. The whole spread
over real API-server processes is tested in tests/integration/test_serve_spread.py."""

from __future__ import annotations

import asyncio
import mmap
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from apiserver import spread
from apiserver.acceptor import Acceptor
from apiserver.load_table import (
    CONNECTIONS,
    DRAINING,
    HEARTBEAT_NS,
    NOT_SERVING,
    ROW_BYTES,
    SERVING,
    STALE_NS,
    STATE,
    LoadTable,
)
from apiserver.spread import Balancer, ShedMiddleware

MAX_CONNECTIONS = 1000


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _servers(path: Path, n: int, clock: Clock | None = None) -> tuple[LoadTable, list[Balancer]]:
    """The launcher's table and ``n`` serving balancers, each over its own mapping of it."""
    launcher = LoadTable.create(str(path), n)
    balancers = [
        Balancer(LoadTable.open(str(path), n), i, MAX_CONNECTIONS, clock or Clock())
        for i in range(n)
    ]
    for b in balancers:
        b.start_serving()
    return launcher, balancers


def _connect(balancer: Balancer, n: int) -> None:
    for _ in range(n):
        balancer.connection_opened()


def test_table_rows_are_shared_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "load.table"
    launcher, (a, b) = _servers(path, 2)
    _connect(a, 3)
    assert launcher.get(0, CONNECTIONS) == 3 and launcher.get(1, CONNECTIONS) == 0
    assert launcher.get(0, STATE) == SERVING
    assert a.table.least_connections() == 0
    # The raw file, as any other process maps it: 64-byte rows of little-endian int64.
    with open(path, "rb") as f:
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert len(raw) == 2 * ROW_BYTES
        assert struct.unpack_from("<qq", raw, 0) == (SERVING, 3)
        raw.close()
    launcher.clear(0)  # the launcher saw server 0 exit
    assert launcher.get(0, CONNECTIONS) == NOT_SERVING
    assert b.table.least_connections() == 0
    launcher.clear(1)
    assert b.table.least_connections() == NOT_SERVING


def test_table_refuses_a_file_of_another_size(tmp_path: Path) -> None:
    LoadTable.create(str(tmp_path / "t"), 3).close()
    with pytest.raises(OSError, match="expected 256"):
        LoadTable.open(str(tmp_path / "t"), 4)
    with pytest.raises(FileNotFoundError):
        LoadTable.open(str(tmp_path / "missing"), 1)


def test_a_stuck_server_is_left_out_of_the_least_loaded(tmp_path: Path) -> None:
    path = tmp_path / "load.table"
    launcher, (a, b, c) = _servers(path, 3)
    _connect(a, 2)
    _connect(b, 5)
    assert c.table.least_connections() == 0  # c itself
    # c's loop stops beating (stuck): the others no longer wait for it to accept.
    with open(path, "r+b") as f:
        raw = mmap.mmap(f.fileno(), 0)
        stale = time.monotonic_ns() - STALE_NS - 1
        struct.pack_into("<q", raw, 2 * ROW_BYTES + HEARTBEAT_NS * 8, stale)
        raw.close()
    assert a.table.least_connections() == 0  # until a's next beat looks
    a.heartbeat()
    b.heartbeat()
    assert a.table.least_connections() == 2
    assert a.may_accept() and not b.may_accept()


def test_only_the_least_loaded_accept_and_ties_go_to_the_oldest_accept(tmp_path: Path) -> None:
    _, (a, b, c) = _servers(tmp_path / "t", 3)
    assert a.may_accept() and b.may_accept() and c.may_accept()  # all at 0, none accepted yet
    _connect(a, 1)
    assert not a.may_accept() and b.may_accept() and c.may_accept()
    _connect(b, 1)
    _connect(c, 1)
    # Level again: the server whose last accept is the oldest takes the next connection.
    assert a.may_accept() and not b.may_accept() and not c.may_accept()
    a.connection_closed()  # one client's sequential fresh connections: a is least loaded
    assert a.may_accept() and not b.may_accept()
    _connect(a, 1)  # a accepted last: of the three level, b's last accept is now the oldest
    assert b.may_accept() and not a.may_accept() and not c.may_accept()
    c.start_draining()  # a draining server neither accepts nor counts as least loaded
    assert not c.may_accept()
    _connect(a, 1)
    assert not a.may_accept() and b.may_accept()


def test_a_connection_that_waited_goes_to_any_server_at_most_one_above(tmp_path: Path) -> None:
    _, (a, b, c) = _servers(tmp_path / "t", 3)
    _connect(a, 3)
    _connect(b, 4)
    _connect(c, 5)
    assert [s.may_accept() for s in (a, b, c)] == [True, False, False]
    # a's loop is slow to take it: after a recheck, b (one above a) may, c (two above) not.
    assert [s.may_accept(waited=True) for s in (a, b, c)] == [True, True, False]
    c.start_draining()
    assert not c.may_accept(waited=True)


def test_shedding_two_above_the_least_at_once_and_one_above_once_a_second(tmp_path: Path) -> None:
    clock = Clock()
    _, (a, b) = _servers(tmp_path / "t", 2, clock)
    _connect(a, 5)
    _connect(b, 2)
    # a is 3 above b: it sheds on every response until the closes it asked for would even
    # things out (the closes have not happened yet).
    assert [a.should_shed() for _ in range(3)] == [True, True, False]
    assert not b.should_shed()
    a.connection_closed()
    a.connection_closed()
    b.connection_opened()  # one of the two reconnected to b: 3 vs 3
    assert not a.should_shed() and not b.should_shed()
    b.connection_opened()  # 3 vs 4: one above; handed back once it has been so for ROTATE_S
    assert not b.should_shed()
    clock.now += spread.ROTATE_S
    assert b.should_shed() and not b.should_shed()
    b.connection_closed()
    a.connection_opened()  # 4 vs 3
    assert not a.should_shed()  # a has been one above for less than ROTATE_S
    clock.now += spread.ROTATE_S / 2
    assert not a.should_shed()
    clock.now += spread.ROTATE_S / 2
    assert a.should_shed() and not a.should_shed()


def test_a_draining_server_closes_every_connection(tmp_path: Path) -> None:
    _, (a, b) = _servers(tmp_path / "t", 2)
    _connect(a, 1)
    a.start_draining()
    assert all(a.should_shed() for _ in range(5))
    assert not b.should_shed()


def test_no_shedding_while_every_server_is_crowded(tmp_path: Path) -> None:
    """A flood near --max-connections on every server: a connection closed now would likely be
    refused where it reconnects, so the servers keep theirs, and shed again once there is room."""
    _, (a, b) = _servers(tmp_path / "t", 2)
    _connect(a, MAX_CONNECTIONS + 5)
    _connect(b, MAX_CONNECTIONS)
    assert not any(a.should_shed() for _ in range(5))
    for _ in range(MAX_CONNECTIONS - int(spread.CROWDED * MAX_CONNECTIONS)):
        b.connection_closed()  # b is down to the crowded mark: still no room worth moving to
    assert not a.should_shed()
    b.connection_closed()
    assert a.should_shed()


def test_a_lone_server_never_sheds(tmp_path: Path) -> None:
    table = LoadTable.private()
    balancer = Balancer(table, 0, MAX_CONNECTIONS)
    assert not balancer.may_accept()  # not serving yet
    balancer.start_serving()
    _connect(balancer, 50)
    assert balancer.may_accept() and not balancer.should_shed()


async def _asgi(app: Any, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    await app(endpoint)({"type": "http", "path": "/"}, receive, send)
    assert sent[1]["type"] == "http.response.body"
    return list(sent[0]["headers"])


def test_middleware_adds_connection_close_only_when_told(tmp_path: Path) -> None:
    _, (a, b) = _servers(tmp_path / "t", 2)
    _connect(a, 2)

    def app(endpoint: Any) -> ShedMiddleware:
        return ShedMiddleware(endpoint, a)

    plain = [(b"content-type", b"text/plain")]
    assert asyncio.run(_asgi(app, plain)) == [*plain, (b"connection", b"close")]
    assert asyncio.run(_asgi(app, plain)) == plain  # one close asked for already
    a.start_draining()
    closing = [(b"connection", b"close")]
    assert asyncio.run(_asgi(app, closing)) == closing  # never twice


class _Hello(asyncio.Protocol):
    """Answers every line with this server's name, keeping the connection."""

    def __init__(self, name: bytes, balancer: Balancer) -> None:
        self._name = name
        self._balancer = balancer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._transport.write(self._name)

    def connection_lost(self, exc: Exception | None) -> None:
        self._balancer.connection_closed()


def test_acceptors_sharing_a_socket_split_a_burst_of_connections(tmp_path: Path) -> None:
    """Two acceptors, as two servers would run them, on one listening socket: a burst of 20
    connections splits 10/10; one server closing three of its connections makes it the one
    that takes the next three."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    launcher = LoadTable.create(str(tmp_path / "t"), 2)

    async def main() -> tuple[list[bytes], list[bytes]]:
        balancers = [
            Balancer(LoadTable.open(str(tmp_path / "t"), 2), i, MAX_CONNECTIONS) for i in range(2)
        ]
        acceptors = [
            Acceptor(
                listener.dup(),
                lambda name=bytes([65 + i]), b=b: _Hello(name, b),
                b,
            )
            for i, b in enumerate(balancers)
        ]
        for acceptor in acceptors:
            acceptor.start()
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
        first = [await _ask(*stream) for stream in streams]
        on_a = [writer for (_, writer), name in zip(streams, first, strict=True) if name == b"A"]
        for writer in on_a[:3]:
            writer.close()
            await writer.wait_closed()
        await _until(lambda: balancers[0].connections == 7)
        later = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        second = [await _ask(*stream) for stream in later]
        for acceptor in acceptors:
            await acceptor.drain(0.0)
        for _, writer in streams + later:
            writer.close()
        assert launcher.get(0, STATE) == launcher.get(1, STATE) == DRAINING
        return first, second

    try:
        first, second = asyncio.run(main())
    finally:
        listener.close()
        launcher.close()
    assert first.count(b"A") == 10 and first.count(b"B") == 10
    assert second == [b"A", b"A", b"A"]


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"?\n")
    return await asyncio.wait_for(reader.readexactly(1), 10)


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
