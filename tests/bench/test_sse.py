"""The SSE parser on hand-made streams, fed whole and in every possible split."""

from __future__ import annotations

import pytest

from bench.sse import SseError, SseParser

STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"a": 1}\n\n'
    b"event: message\r\nid: 7\r\ndata: line one\r\ndata: line two\r\n\r\n"
    b"data:no-space\r\rdata:  two spaces\n\n"
    b"retry: 100\n\n"
    b"data\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [b'{"a": 1}', b"line one\nline two", b"no-space", b" two spaces", b"", b"[DONE]"]


def _feed_all(parser: SseParser, chunks: list[bytes]) -> list[bytes]:
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_whole_stream() -> None:
    assert _feed_all(SseParser(), [STREAM]) == EVENTS


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13])
def test_fixed_size_reads(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert _feed_all(SseParser(), chunks) == EVENTS


def test_every_two_way_split_gives_the_same_events() -> None:
    for cut in range(len(STREAM) + 1):
        assert _feed_all(SseParser(), [STREAM[:cut], STREAM[cut:]]) == EVENTS, cut


def test_crlf_split_between_reads_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == [b"x"]
    assert parser.feed(b"\ndata: y\n\n") == [b"y"]


def test_event_is_dispatched_only_at_the_blank_line() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\n") == []
    assert parser.feed(b"data: y") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [b"x\ny"]


def test_an_oversized_event_is_refused() -> None:
    parser = SseParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 60 + b"\n")
    with pytest.raises(SseError):
        parser.feed(b"data: " + b"y" * 60 + b"\n")


def test_an_endless_line_is_refused() -> None:
    parser = SseParser(max_event_bytes=100)
    with pytest.raises(SseError):
        for _ in range(20):
            parser.feed(b"data: " + b"z" * 10)
