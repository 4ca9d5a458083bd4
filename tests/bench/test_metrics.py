"""vLLM's serving metrics on hand-made records, and one streamed response turned into a record
chunk by chunk with hand-set arrival times."""

from __future__ import annotations

import pytest

from bench.metrics import (
    RequestRecord,
    latency_summary,
    served_in_window,
    server_share,
    summarize,
)
from bench.stream import StreamHandler


def _ok(
    ttft: float, latency: float, tokens: int, itl: list[float], prompt: int, server: str
) -> RequestRecord:
    return RequestRecord(
        "image", False, ttft=ttft, latency=latency, output_tokens=tokens, itl=itl,
        prompt_tokens=prompt, status=200, server=server, success=True,
    )  # fmt: skip


RECORDS = [
    _ok(0.1, 0.5, 5, [0.1, 0.1, 0.1, 0.1], 10, "0"),
    _ok(0.2, 1.0, 3, [0.4, 0.4], 20, "1"),
    _ok(0.3, 0.3, 1, [], 30, "1"),
    RequestRecord("image", False, status=429, error="http 429: queue full"),
    RequestRecord("image", False, error="timeout: no complete response in 5 s"),
]


def test_counts_and_throughputs() -> None:
    m = summarize(RECORDS, duration_s=2.0)
    assert (m["completed"], m["failed"], m["rate_limited"]) == (3, 2, 1)
    assert m["errors"] == {"http 429": 1, "timeout": 1}
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 9)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert "request_goodput" not in m


def test_latency_statistics_follow_vllm() -> None:
    m = summarize(RECORDS, duration_s=2.0, percentiles=[50, 99])
    assert m["mean_ttft_ms"] == pytest.approx(200)
    assert m["median_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(298)  # linear interpolation, as np.percentile
    # TPOT leaves out the first token and one-token requests: (0.4 / 4, 0.8 / 2).
    assert m["mean_tpot_ms"] == pytest.approx(250)
    assert m["median_tpot_ms"] == pytest.approx(250)
    assert m["mean_itl_ms"] == pytest.approx(200)  # pooled over all requests' gaps
    assert m["median_itl_ms"] == pytest.approx(100)
    assert m["mean_e2el_ms"] == pytest.approx(600)
    assert m["median_e2el_ms"] == pytest.approx(500)
    assert m["p50_e2el_ms"] == pytest.approx(500)
    assert m["std_ttft_ms"] == pytest.approx(81.6496, rel=1e-4)


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        ({"ttft": 250, "tpot": 150}, 1),  # only the first meets both
        ({"tpot": 150}, 2),  # a one-token request's TPOT counts as 0
        ({"e2el": 600}, 2),
        ({"ttft": 50}, 0),
    ],
)
def test_goodput_counts_requests_meeting_every_slo(slos: dict[str, float], good: int) -> None:
    m = summarize(RECORDS, duration_s=2.0, goodput_ms=slos)
    assert m["request_goodput"] == pytest.approx(good / 2.0)


def test_served_in_window_counts_completions_inside_it_whoever_sent_them() -> None:
    records = [
        RequestRecord("image", True, start=0.5, latency=1.0, output_tokens=4, success=True),
        RequestRecord("image", False, start=1.0, latency=2.0, output_tokens=4, success=True),
        RequestRecord("image", False, start=2.0, latency=0.5, output_tokens=4, success=False),
        RequestRecord("image", False, start=9.0, latency=3.0, output_tokens=4, success=True),
    ]
    # Window [1, 11]: the warm-up request ends at 1.5 and counts, the failure does not, the
    # last ends at 12, after the window.
    out = served_in_window(records, 1.0, 11.0)
    assert out["window_completed"] == 2 and out["window_seconds"] == 10.0
    assert out["window_request_throughput"] == pytest.approx(0.2)
    assert out["window_output_throughput"] == pytest.approx(0.8)


def test_nothing_completed_gives_zeros_not_errors() -> None:
    m = summarize([RECORDS[3]], duration_s=1.0)
    assert m["completed"] == 0 and m["mean_ttft_ms"] == 0 and m["p99_itl_ms"] == 0


def test_server_share_and_probe_summary() -> None:
    assert server_share(RECORDS) == {"0": 1, "1": 2}
    extra = RequestRecord("image", False, server="10", success=True)
    assert list(server_share([*RECORDS, extra])) == ["0", "1", "10"]
    summary = latency_summary([0.001, 0.002, 0.010], failures=2)
    assert summary["count"] == 3 and summary["failed"] == 2
    assert summary["median_ms"] == pytest.approx(2) and summary["max_ms"] == pytest.approx(10)


def _chunk(content: str, finish: str | None = None) -> bytes:
    reason = f', "finish_reason": "{finish}"' if finish else ""
    return b'data: {"choices": [{"delta": {"content": "%s"}%s}]}\n\n' % (
        content.encode(),
        reason.encode(),
    )


def test_stream_timestamps_make_ttft_itl_and_latency() -> None:
    record = RequestRecord("image", False, start=10.0)
    handler = StreamHandler(record)
    handler.on_head(200, {"content-type": "text/event-stream", "x-fanin-server": "3"})
    # The role chunk comes before any token: it is not the first token.
    handler.on_body(
        b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n', 10.05
    )
    handler.on_body(_chunk("He"), 10.30)
    handler.on_body(_chunk("llo") + _chunk(" w"), 10.50)  # two events in one read
    handler.on_body(_chunk("orld", "length")[:20], 10.55)  # an event split across reads
    handler.on_body(_chunk("orld", "length")[20:], 10.60)
    handler.on_body(b'data: {"choices": [], "usage": {"prompt_tokens": 12, ', 10.605)
    handler.on_body(b'"completion_tokens": 4}}\n\ndata: [DONE]\n\n', 10.61)
    handler.finish()
    assert record.success and record.error == ""
    assert record.ttft == pytest.approx(0.30)
    assert record.itl == pytest.approx([0.20, 0.0, 0.10])
    assert record.latency == pytest.approx(0.61)  # the last data event before [DONE]
    assert (record.prompt_tokens, record.output_tokens, record.server) == (12, 4, "3")
    assert record.tpot == pytest.approx(0.31 / 3)


def test_completion_chunks_count_too() -> None:
    record = RequestRecord("sharegpt", False, start=0.0)
    handler = StreamHandler(record)
    handler.on_head(200, {"content-type": "text/event-stream"})
    handler.on_body(
        b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": "b"}]}\n\n', 1.0
    )
    handler.on_body(b"data: [DONE]\n\n", 2.0)
    handler.finish()
    # No usage chunk: the output length falls back to the chunks that carried text.
    assert record.success and record.ttft == 1.0 and record.output_tokens == 2


def test_http_errors_and_broken_streams_are_failures() -> None:
    rejected = RequestRecord("image", False)
    handler = StreamHandler(rejected)
    handler.on_head(429, {"content-type": "application/json"})
    handler.on_body(b'{"error": {"message": "preprocessing queue is full"}}', 1.0)
    handler.finish()
    assert not rejected.success and rejected.error == "http 429: preprocessing queue is full"

    cut = RequestRecord("image", False)
    handler = StreamHandler(cut)
    handler.on_head(200, {"content-type": "text/event-stream"})
    handler.on_body(_chunk("x"), 1.0)
    handler.finish()
    assert not cut.success and cut.error == "stream: ended before [DONE]"

    failed = StreamHandler(RequestRecord("image", False))
    failed.on_head(200, {"content-type": "text/event-stream"})
    with pytest.raises(ValueError, match="engine died"):
        failed.on_body(b'data: {"error": {"message": "engine died", "code": 503}}\n\n', 1.0)
    with pytest.raises(ValueError, match="not a JSON chunk"):
        failed.on_body(b"data: {oops\n\n", 1.0)

    plain = RequestRecord("image", False)
    handler = StreamHandler(plain)
    handler.on_head(200, {"content-type": "application/json"})
    handler.on_body(b"{}", 1.0)
    handler.finish()
    assert not plain.success and "not text/event-stream" in plain.error
