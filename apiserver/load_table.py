"""The API servers' load, in shared memory: one row per server, which every server reads to
decide whether to accept a connection or to hand one back (``apiserver.spread``), and whether
the host's queue has room for a new request (``apiserver.admission``).

The launcher creates the table as a file in its private run dir (removed with it) and clears
the row of a server that exited; each server maps the file and writes only its own row, so no
lock is needed: a reader sees each int64 either before or after a write, and a value a moment
old is as good as a current one for spreading load. A row is 64 bytes, one cache line, so
servers writing their own rows never contend for a line.
"""

from __future__ import annotations

import mmap
import os
import time

#: int64 fields of a row; the rest of its 8 slots is padding.
STATE, CONNECTIONS, HEARTBEAT_NS, PENDING, LAST_ACCEPT_NS, QUEUED = 0, 1, 2, 3, 4, 5
ROW_FIELDS = 8
ROW_BYTES = ROW_FIELDS * 8

#: Row states. Only SERVING rows take part in the spread.
EMPTY, STARTING, SERVING, DRAINING = 0, 1, 2, 3
#: CONNECTIONS of a row that is not SERVING: larger than any real count, so that ``min`` over
#: the column skips it without a branch.
NOT_SERVING = 1 << 62
#: A SERVING row whose heartbeat is older than this is ignored: its server is stuck (a healthy
#: event loop beats every second and never runs more than milliseconds of work at a time).
STALE_NS = 5_000_000_000


class LoadTable:
    """``rows`` rows over a shared mapping. Build with ``create``, ``open`` or ``private``."""

    def __init__(self, mapping: mmap.mmap, rows: int) -> None:
        self._mapping = mapping
        self.rows = rows
        self._cells = memoryview(mapping).cast("q")
        # Strided views of columns, made once: they follow the shared memory.
        self._states = self._cells[STATE::ROW_FIELDS]
        self._connections = self._cells[CONNECTIONS::ROW_FIELDS]
        self._heartbeats = self._cells[HEARTBEAT_NS::ROW_FIELDS]
        self._pending = self._cells[PENDING::ROW_FIELDS]
        self._queued = self._cells[QUEUED::ROW_FIELDS]
        self._last_accepts = self._cells[LAST_ACCEPT_NS::ROW_FIELDS]
        #: SERVING rows whose heartbeat was stale at the last ``find_stuck``.
        self._stuck: frozenset[int] = frozenset()

    @classmethod
    def create(cls, path: str, rows: int) -> LoadTable:
        """A new table file at ``path`` (mode 0600), every row EMPTY (the launcher)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, rows * ROW_BYTES)
            table = cls(mmap.mmap(fd, rows * ROW_BYTES), rows)
        finally:
            os.close(fd)
        for index in range(rows):
            table.clear(index)
        return table

    @classmethod
    def open(cls, path: str, rows: int) -> LoadTable:
        """Map the launcher's table (an API server). Raises OSError when it is missing or does
        not hold ``rows`` rows."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != rows * ROW_BYTES:
                raise OSError(f"load table {path} has {size} bytes, expected {rows * ROW_BYTES}")
            return cls(mmap.mmap(fd, size), rows)
        finally:
            os.close(fd)

    @classmethod
    def private(cls) -> LoadTable:
        """A one-row table of this process alone (an API server started without a launcher)."""
        table = cls(mmap.mmap(-1, ROW_BYTES), 1)
        table.clear(0)
        return table

    def close(self) -> None:
        views = (self._states, self._connections, self._heartbeats, self._pending, self._queued)
        for view in (*views, self._last_accepts, self._cells):
            view.release()
        self._mapping.close()

    def clear(self, index: int) -> None:
        """Mark row ``index`` EMPTY: its server is gone (or not started)."""
        self._set(index, STATE, EMPTY)
        self._set(index, CONNECTIONS, NOT_SERVING)
        self._set(index, HEARTBEAT_NS, 0)
        self._set(index, PENDING, 0)
        self._set(index, QUEUED, 0)
        self._set(index, LAST_ACCEPT_NS, 0)

    def publish(self, index: int, state: int, connections: int) -> None:
        """Row ``index``'s state and connection count, with a fresh heartbeat."""
        self._set(index, HEARTBEAT_NS, time.monotonic_ns())
        self._set(index, CONNECTIONS, connections if state == SERVING else NOT_SERVING)
        self._set(index, STATE, state)

    def publish_accept(self, index: int, at_ns: int) -> None:
        """When row ``index``'s server last accepted a connection."""
        self._set(index, LAST_ACCEPT_NS, at_ns)

    def beat(self, index: int) -> None:
        self._set(index, HEARTBEAT_NS, time.monotonic_ns())

    def publish_pending(self, index: int, pending: int, queued: int) -> None:
        """Row ``index``'s requests admitted but not yet sent to the engine, and how many of
        them wait for a render thread (admission)."""
        self._set(index, PENDING, pending)
        self._set(index, QUEUED, queued)

    def total_pending(self) -> int:
        """Requests admitted by every server and not yet sent to the engine. Rows of servers
        that are gone were cleared to 0; a draining server's still count."""
        return int(sum(self._pending))

    def total_queued(self) -> int:
        """Of ``total_pending``, the requests waiting for a render thread."""
        return int(sum(self._queued))

    def get(self, index: int, field: int) -> int:
        return int(self._cells[index * ROW_FIELDS + field])

    def least_connections(self) -> int:
        """The fewest connections any SERVING server holds, stuck ones left out (NOT_SERVING
        when none). On every request: one pass over a column, about a microsecond."""
        if not self._stuck:
            return int(min(self._connections))
        live = (c for i, c in enumerate(self._connections) if i not in self._stuck)
        return int(min(live, default=NOT_SERVING))

    def oldest_accept(self, connections: int) -> int:
        """The least recent last accept among the live SERVING rows holding ``connections``
        (the spread's tie-break; called per accept, not per request)."""
        rows = zip(self._connections.tolist(), self._last_accepts.tolist(), strict=True)
        tied = (a for i, (c, a) in enumerate(rows) if c == connections and i not in self._stuck)
        return int(min(tied, default=0))

    def find_stuck(self) -> None:
        """Note which SERVING rows stopped beating (each server calls it with its own beat,
        once a second), for ``least_connections`` to leave them out."""
        oldest = time.monotonic_ns() - STALE_NS
        rows = zip(self._states.tolist(), self._heartbeats.tolist(), strict=True)
        self._stuck = frozenset(i for i, (s, b) in enumerate(rows) if s == SERVING and b < oldest)

    def _set(self, index: int, field: int, value: int) -> None:
        self._cells[index * ROW_FIELDS + field] = value
