"""Family 1: clients that send too much, too slowly, or nothing at all (http_guard): oversize
headers (431) and request lines (414), trickled and idle heads (408 / closed), trickled bodies
(408) that must not hold admission slots, and connection floods (503, shed politely). Each
attack runs against the stand-in stack; the ones the issue measured also against a real
`fanin serve`."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hostile_kit import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_INFLIGHT,
    HealthProbe,
    assert_served,
    error_of,
)

pytestmark = pytest.mark.slow

#: Every attack below ends within this many seconds (the limits are a second or two).
ATTACK_BOUND_S = 15.0


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=ATTACK_BOUND_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (bounded by the socket timeout)."""
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def _send_until_refused(sock: socket.socket, head: bytes, filler: bytes, limit: int) -> None:
    """Send ``head`` then ``filler`` until ``limit`` bytes or until the server stops reading."""
    sent = 0
    try:
        sock.sendall(head)
        while sent < limit:
            sock.sendall(filler)
            sent += len(filler)
    except OSError:  # the server answered and closed: what the attack is meant to meet
        pass


def _attack(n: int, one: Callable[[], bytes], seconds: float = 1.0) -> list[bytes]:
    """``n`` threads each repeating ``one`` for ``seconds`` (so the probe sees the attack)."""

    def repeat() -> list[bytes]:
        until = time.monotonic() + seconds
        out = [one()]
        while time.monotonic() < until:
            out.append(one())
        return out

    with ThreadPoolExecutor(n) as pool:
        return [raw for answers in pool.map(lambda _: repeat(), range(n)) for raw in answers]


@pytest.mark.parametrize("target", ["fake_url", "real_url"])
def test_huge_headers_get_431_fast(target: str, request: pytest.FixtureRequest) -> None:
    """Six connections each sending a 100 MB header (the issue's attack, capped at 8 MB
    here): each is answered 431 after the cap, not parsed."""
    url = request.getfixturevalue(target)

    def one() -> bytes:
        with _connect(url) as sock:
            _send_until_refused(sock, b"GET /health HTTP/1.1\r\nX-Big: ", b"a" * 65536, 8 << 20)
            return _read_to_close(sock)

    start = time.monotonic()
    with HealthProbe(url) as probe:
        answers = _attack(6, one)
    assert time.monotonic() - start < ATTACK_BOUND_S
    assert len(answers) >= 6
    for raw in answers:
        error_of(raw, 431, str(MAX_HEADER_BYTES))
    probe.check()
    assert_served(url)


def test_long_request_line_gets_414(fake_url: str) -> None:
    def one() -> bytes:
        with _connect(fake_url) as sock:
            _send_until_refused(sock, b"GET /", b"a" * 4096, 1 << 20)
            return _read_to_close(sock)

    with HealthProbe(fake_url) as probe:
        answers = _attack(2, one)
    for raw in answers:
        assert error_of(raw, 414, "8192")["code"] == "request_line_too_long"
    probe.check()
    assert_served(fake_url)


def test_trickled_and_idle_heads_are_bounded_in_time(fake_url: str) -> None:
    """Twenty connections trickle a head one byte every 50 ms, twenty send nothing: the
    first get 408 once the header timeout passes, the others are closed."""

    def trickle() -> bytes:
        with _connect(fake_url) as sock:
            try:
                for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"z" * 1000:
                    sock.send(bytes([byte]))
                    time.sleep(0.05)
            except OSError:
                pass
            return _read_to_close(sock)

    def idle() -> bytes:
        with _connect(fake_url) as sock:
            return _read_to_close(sock)

    start = time.monotonic()
    with HealthProbe(fake_url) as probe, ThreadPoolExecutor(40) as pool:
        trickled = [pool.submit(trickle) for _ in range(20)]
        idled = [pool.submit(idle) for _ in range(20)]
        answers = [f.result() for f in trickled]
        silent = [f.result() for f in idled]
    elapsed = time.monotonic() - start
    assert HEADER_TIMEOUT_S <= elapsed < HEADER_TIMEOUT_S + 10
    for raw in answers:
        assert error_of(raw, 408, "headers")["code"] == "header_timeout"
    assert silent == [b""] * 20
    probe.check()
    assert_served(fake_url)


@pytest.mark.parametrize("target", ["fake_url", "real_url"])
def test_trickled_bodies_get_408_and_hold_no_admission_slot(
    target: str, request: pytest.FixtureRequest
) -> None:
    """More connections than the server admits at once send their headers and one body
    byte: each gets 408 after the body timeout, and meanwhile a normal client is served
    (they never took its admission slot)."""
    url = request.getfixturevalue(target)
    n = 3 * MAX_INFLIGHT
    started = threading.Barrier(n + 1)

    def one() -> bytes:
        with _connect(url) as sock:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            started.wait()
            return _read_to_close(sock)

    start = time.monotonic()
    with HealthProbe(url) as probe, ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one) for _ in range(n)]
        started.wait()
        assert_served(url)  # while every slow body is still arriving:
        assert not any(f.done() for f in futures)
        answers = [f.result() for f in futures]
    assert BODY_TIMEOUT_S <= time.monotonic() - start < BODY_TIMEOUT_S + 10
    for raw in answers:
        assert error_of(raw, 408, "body")["code"] == "body_timeout"
    probe.check()
    assert_served(url)


@pytest.mark.parametrize("target", ["fake_url", "real_url"])
def test_connection_flood_is_shed_with_503(target: str, request: pytest.FixtureRequest) -> None:
    """Far more connections than the cap, each holding a half-sent head: the ones past the
    cap get an immediate 503 with Retry-After, the probe's connection (opened first) keeps
    answering, and once the flood is over a normal client is served."""
    url = request.getfixturevalue(target)
    servers = 2 if target == "real_url" else 1
    with HealthProbe(url) as probe:
        flood = [_connect(url) for _ in range(servers * MAX_CONNECTIONS + 40)]
        for sock in flood:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
        answered: dict[socket.socket, bytes] = {}
        with selectors.DefaultSelector() as sel:
            for sock in flood:
                sel.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + HEADER_TIMEOUT_S / 2  # before any 408 is due
            while (left := deadline - time.monotonic()) > 0:
                for key, _ in sel.select(left):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    sel.unregister(sock)
                    answered[sock] = _read_to_close(sock)
    for sock in flood:
        sock.close()
    assert len(answered) >= 40, len(answered)
    for raw in answered.values():
        error = error_of(raw, 503, "connections")
        assert error["code"] == "too_many_connections" and b"retry-after: 1" in raw.lower()
    probe.check(min_samples=3)
    assert_served(url)


def test_http_still_works(fake_url: str) -> None:
    """What the guard must not break: pipelined requests (one with a body), chunked bodies,
    a head split over many reads, and keep-alive."""
    body = b'{"model":"default","prompt":"hi","max_tokens":2}'
    pipelined = (
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (len(body), body)
    )
    with _connect(fake_url) as sock:
        sock.sendall(pipelined)
        raw = _read_to_close(sock)
    assert raw.count(b"HTTP/1.1 200 OK") == 3, raw[:600]
    assert b'"text_completion"' in raw and b'"version"' in raw
    with _connect(fake_url) as sock:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        for piece in (head[:8], head[8:19], head[19:30], head[30:-1], head[-1:]):
            sock.sendall(piece)
            time.sleep(0.01)
        assert _read_to_close(sock).startswith(b"HTTP/1.1 200 OK")

    def chunks() -> Iterator[bytes]:
        yield b'{"model":"default",'
        yield b'"prompt":"hi","max_tokens":2}'

    with httpx.Client(base_url=fake_url, timeout=30) as http:
        chunked = http.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 200, chunked.text
        assert all(http.get("/health").status_code == 200 for _ in range(5))  # keep-alive
