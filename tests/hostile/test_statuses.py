"""Family 5: statuses and error bodies (app, middleware, http_guard). Every error is an OpenAI
error object (Starlette's own 404/405/500 and uvicorn's bad-HTTP 400 included); a client that
leaves before its answer is complete counts as 499 and is logged at info, without a
traceback."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fanin_proc import Fanin
from hostile_kit import HealthProbe, assert_error, assert_served, error_of
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from apiserver.admission import Admission
from apiserver.app import EXCEPTION_HANDLERS
from apiserver.config import ServerConfig
from apiserver.load_table import LoadTable
from apiserver.middleware import FaninMiddleware
from ipc.messages import EngineLoad

pytestmark = pytest.mark.slow

TARGETS = ["fake_url", "real_url"]
LONG = {"model": "default", "prompt": "one two three", "max_tokens": 400, "ignore_eos": True}


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def _status_count(url: str, endpoint: str, status: str) -> float:
    with httpx.Client(base_url=url, timeout=30) as http:
        text = http.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "fanin_requests"
        for sample in family.samples
        if sample.name == "fanin_requests_total"
        and sample.labels == {"endpoint": endpoint, "status": status}
    )


@pytest.mark.parametrize("target", TARGETS)
def test_every_error_is_an_openai_object(target: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(target)
    with HealthProbe(url) as probe, httpx.Client(base_url=url, timeout=30) as http:
        assert_error(http.get("/v1/nothing-here"), 404)
        assert_error(http.get("/v1/completions"), 405)
        assert_error(http.post("/v1/completions", content=b"{no json"), 400, "JSON")
        with _connect(url) as sock:  # a terabyte announced: refused before a byte is read
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                % (1 << 40)
            )
            assert error_of(_read_response(sock), 413)["code"] == "body_too_large"
        with _connect(url) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            raw = _read_response(sock)
        assert error_of(raw, 400, "invalid HTTP")["code"] == "invalid_http"
    probe.check(min_samples=1)
    assert_served(url)


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, off a raw socket."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += sock.recv(65536) or b"\r\n\r\n"
    head, _, body = raw.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_unexpected_exceptions_are_openai_500s() -> None:
    """A handler that raises something unforeseen: the client reads an OpenAI 500, not
    Starlette's plain text (the app's own handlers, behind the fanin middleware)."""

    async def boom(request: Request) -> Response:
        raise RuntimeError("a bug")

    app = FaninMiddleware(
        Starlette(routes=[Route("/boom", boom)], exception_handlers=EXCEPTION_HANDLERS),
        index=0,
        api_key=None,
        max_body_bytes=1024,
        admission=Admission(
            ServerConfig(),
            lambda: (EngineLoad(), 0.0),
            lambda: 0,
            SimpleNamespace(is_full=False, queued=0),
            LoadTable.private(),
            0,
        ),
    )

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://fanin") as http:
            return await http.get("/boom")

    response = asyncio.run(call())
    assert assert_error(response, 500, "internal server error")["type"] == "server_error"


def _leave_mid_body(url: str) -> None:
    with _connect(url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\n\r\n" + b'{"model": "default", "prompt": "' + b"a" * 100
        )
        time.sleep(0.2)


def _leave_mid_stream(url: str) -> None:
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response,
    ):
        assert response.status_code == 200
        next(response.iter_bytes())


def _leave_mid_generation(url: str) -> None:
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=0.3)) as http,
    ):
        http.post("/v1/completions", json=LONG)


@pytest.mark.parametrize("target", TARGETS)
def test_clients_that_leave_count_as_499_and_log_no_traceback(
    target: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(target)
    log = _log_reader(request, target)
    before = _status_count(url, "/v1/completions", "499")
    mark = len(log())
    with HealthProbe(url) as probe:
        for leave in (_leave_mid_body, _leave_mid_stream, _leave_mid_generation):
            for _ in range(3):
                leave(url)
    deadline = time.monotonic() + 10
    while _status_count(url, "/v1/completions", "499") < before + 9:
        assert time.monotonic() < deadline, "not every leaving client counted as 499"
        time.sleep(0.1)
    new = log()[mark:]
    assert "the client left before its answer was complete" in new
    assert "Traceback" not in new and "ClientDisconnect" not in new
    assert _status_count(url, "/v1/completions", "500") == 0
    probe.check()
    assert_served(url)


def _log_reader(request: pytest.FixtureRequest, target: str) -> Any:
    if target == "fake_url":
        stack = request.getfixturevalue("fake")
        return lambda: stack.server_log.read_text()
    fanin: Fanin = request.getfixturevalue("real")
    return fanin.log


@pytest.mark.parametrize("target", TARGETS)
def test_an_answer_sent_before_the_body_is_read_by_a_client_still_sending_it(
    target: str, request: pytest.FixtureRequest
) -> None:
    """The app answers before reading the body (a 404 here; an admission 429 or a wrong key
    alike) on a connection the client asked to close. Closing at once, with body bytes still
    arriving, would answer them with a reset, and the client could lose the answer it has not
    read yet; the server half-closes instead and reads and drops the rest, so the client sends
    its whole body and then reads the 404."""
    url = request.getfixturevalue(target)
    size = 8 << 20
    with _connect(url) as sock:
        sock.sendall(
            b"POST /v1/nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
        )
        time.sleep(0.3)  # the 404 is sent and the server is done with the request
        chunk = b"x" * (256 << 10)
        for _ in range(size // len(chunk)):  # a reset here would raise
            sock.sendall(chunk)
        assert error_of(_read_response(sock), 404)
    assert_served(url)
