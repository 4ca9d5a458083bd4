"""apiserver.http_guard in-process, without sockets (the stand-in transport of
bench/http_guard_bench.py): whatever way a request's bytes arrive (split anywhere, pipelined
behind bodies of either kind), the app receives exactly that request; the head caps hold at
their exact edges, however the head is paced; and a refused connection reads no more."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from apiserver.http_guard import MAX_REQUEST_LINE_BYTES, HttpLimits, guarded_protocol
from bench.http_guard_bench import open_connection

CAP = 1024
LIMITS = HttpLimits(max_header_bytes=CAP, header_timeout_s=30, body_timeout_s=30, max_connections=8)


def serve(reads: list[bytes], limits: HttpLimits = LIMITS) -> tuple[list[Any], bytes, Any]:
    """Feed ``reads`` to one guarded connection, then let the app run: the requests the app
    saw (method, path, body), what went on the wire, the transport."""
    seen: list[tuple[str, str, bytes]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.append((scope["method"], scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    loop = asyncio.new_event_loop()
    try:
        protocol = open_connection(guarded_protocol(limits), loop, app)
        for data in reads:
            protocol.data_received(data)
        _settle(loop)
        transport = protocol.transport
        protocol.connection_lost(None)
        _settle(loop)
    finally:
        loop.close()
    return seen, bytes(transport.written), transport


def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Let the app run as far as it can (an app waiting for more body stays waiting)."""
    for _ in range(50):  # loop turns: pipelined requests start one after another
        loop.run_until_complete(asyncio.sleep(0))


def post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        len(body),
        body,
    )


def chunked(path: str, body: bytes, size: int = 100) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % path.encode()
    return head + chunks + b"0\r\n\r\n"


def get(path: str, pad: int = 0) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n" % (path.encode(), b"p" * pad)


def test_pipelined_requests_reach_the_app_whole() -> None:
    body = bytes(range(256)) * 9  # longer than a chunked slice (a quarter of the cap)
    raw = post("/a", b"hello") + get("/b") + chunked("/c", body) + get("/d", pad=700) + get("/e")
    seen, written, _ = serve([raw])
    assert seen == [
        ("POST", "/a", b"hello"),
        ("GET", "/b", b""),
        ("POST", "/c", body),
        ("GET", "/d", b""),
        ("GET", "/e", b""),
    ]
    assert written.count(b"HTTP/1.1 200 OK") == 5


@pytest.mark.parametrize("make", [post, chunked])
def test_any_split_of_a_request_is_the_same_request(make: Any) -> None:
    raw = make("/split", b"0123456789" * 30) + get("/after")
    expected = [("POST", "/split", b"0123456789" * 30), ("GET", "/after", b"")]
    head_end = raw.index(b"\r\n\r\n") + 4
    cuts = [*range(1, head_end + 2), *range(head_end + 2, len(raw), 13), len(raw) - 1]
    for cut in cuts:  # every byte of the first head, a stride through the rest
        assert serve([raw[:cut], raw[cut:]])[0] == expected, cut
    assert serve([raw[i : i + 1] for i in range(len(raw))])[0] == expected


@pytest.mark.parametrize("paced", [False, True])
def test_head_cap_at_its_edge(paced: bool) -> None:
    exact = get("/edge", pad=CAP - len(get("/edge")))
    assert len(exact) == CAP
    for head, served in ((exact, True), (get("/edge", pad=CAP + 1 - len(get("/edge"))), False)):
        reads = [head[i : i + 7] for i in range(0, len(head), 7)] if paced else [head]
        seen, written, _ = serve(reads)
        if served:
            assert seen == [("GET", "/edge", b"")]
        else:
            assert not seen and written.startswith(b"HTTP/1.1 431 ")


def test_request_line_cap_at_its_edge() -> None:
    limits = HttpLimits(64 << 10, 30, 30, 8)
    fill = MAX_REQUEST_LINE_BYTES - len(b"GET / HTTP/1.1")
    longest = b"GET /" + b"a" * fill + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    seen, _, _ = serve([longest], limits)
    assert len(seen) == 1 and len(seen[0][1]) == fill + 1
    seen, written, _ = serve([longest.replace(b"GET /", b"GET /a", 1)], limits)
    assert not seen and written.startswith(b"HTTP/1.1 414 ")


def test_a_refused_connection_reads_no_more() -> None:
    big = get("/x", pad=2 * CAP)
    seen, written, transport = serve([big, get("/never")])
    assert not seen
    assert written.count(b"HTTP/1.1") == 1 and b'"headers_too_large"' in written
