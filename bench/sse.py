"""An incremental ``text/event-stream`` parser (the WHATWG rules the load generator needs).

Bytes are fed as the socket delivers them; each complete event's data comes back at once, so
the caller can stamp it with the arrival time of the read that completed it. Lines end with
LF, CR or CRLF (a CRLF split across two reads is one line end); ``data:`` lines of one event
are joined with LF; comments (``:``) and the other fields (``event``, ``id``, ``retry``) are
skipped, as OpenAI-style streams carry everything in ``data``.
"""

from __future__ import annotations


class SseError(ValueError):
    """The stream broke the format or a size bound."""


class SseParser:
    """Feed raw bytes, get the data of every event they complete."""

    __slots__ = ("_partial", "_data", "_size", "_after_cr", "_max_event_bytes")

    def __init__(self, max_event_bytes: int = 8 << 20) -> None:
        self._partial = b""
        self._data: list[bytes] = []
        self._size = 0
        self._after_cr = False
        self._max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of each event that ``chunk`` completes, in order."""
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF whose CR ended the previous read
        if not chunk:
            return []
        self._after_cr = chunk[-1:] == b"\r"
        lines = (self._partial + chunk).splitlines(keepends=True)
        last = lines[-1]
        if last[-1:] in (b"\n", b"\r"):
            self._partial = b""
        else:
            self._partial = lines.pop()
        events: list[bytes] = []
        for line in lines:
            line = line.rstrip(b"\r\n")
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data, self._size = [], 0
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                value = value[1:] if value[:1] == b" " else value
                self._size += len(value)
                self._data.append(value)
        if self._size + len(self._partial) > self._max_event_bytes:
            raise SseError(f"an event exceeds {self._max_event_bytes} bytes")
        return events
