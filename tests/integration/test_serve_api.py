"""The OpenAI API end to end through `fanin serve --api-server-count 2` and the default model,
with the official ``openai`` client; and an API server killed under load is replaced."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fanin_proc import SERVED_NAME, Fanin, get, image_data_url, is_alive

from bench.datasets import sharegpt_prompts

pytestmark = pytest.mark.slow


def _model(fanin: Fanin) -> str:
    return fanin.client().models.list().data[0].id


def test_ready_health_and_served_name(fanin: Fanin) -> None:
    assert get(fanin, "/ready").status_code == 200
    assert get(fanin, "/health").status_code == 200
    assert [m.id for m in fanin.client().models.list().data] == [SERVED_NAME]


def test_chat_text_and_image(fanin: Fanin) -> None:
    client = fanin.client()
    model = _model(fanin)
    question = sharegpt_prompts(1, max_chars=300)[0]
    text = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=8
    )
    assert isinstance(text.choices[0].message.content, str)
    assert text.usage is not None and 1 <= text.usage.completion_tokens <= 8
    with_image = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url()}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        max_tokens=8,
    )
    assert with_image.usage is not None
    # The image's placeholder tokens count as prompt tokens.
    assert with_image.usage.prompt_tokens > text.usage.prompt_tokens + 16


def test_chat_streaming(fanin: Fanin) -> None:
    stream = fanin.client().chat.completions.create(
        model=_model(fanin),
        messages=[{"role": "user", "content": sharegpt_prompts(2, max_chars=300)[1]}],
        max_tokens=12,
        stream=True,
    )
    chunks = list(stream)
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_completions(fanin: Fanin) -> None:
    result = fanin.client().completions.create(
        model=_model(fanin), prompt=sharegpt_prompts(3, max_chars=300)[2], max_tokens=6
    )
    assert isinstance(result.choices[0].text, str)
    assert result.choices[0].finish_reason in ("stop", "length")


def test_embeddings(fanin: Fanin) -> None:
    texts = sharegpt_prompts(2, max_chars=300)
    result = fanin.client().embeddings.create(model=_model(fanin), input=texts)
    assert len(result.data) == 2
    for item in result.data:
        assert len(item.embedding) > 8
        assert math.isclose(math.sqrt(sum(x * x for x in item.embedding)), 1.0, rel_tol=1e-3)
    assert result.data[0].embedding != result.data[1].embedding


def test_concurrent_clients_reach_both_servers(fanin: Fanin) -> None:
    seen: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(25):
            responses = list(pool.map(lambda _: get(fanin, "/health"), range(8)))
            assert all(r.status_code == 200 for r in responses)
            seen |= {r.headers["x-fanin-server"] for r in responses}
            if seen == {"0", "1"}:
                break
    assert seen == {"0", "1"}


def test_crashed_api_server_is_respawned_while_requests_succeed(fanin: Fanin) -> None:
    """SIGSEGV, as a crash in native code would: the server's stack is in the log (the
    launcher's faulthandler, inherited through the fork), and a new server takes its place."""
    old_pid = fanin.server_pid(0)
    assert old_pid is not None and fanin.server_pid(1) is not None
    model = _model(fanin)
    stop = threading.Event()
    ok: list[float] = []
    failed: list[str] = []
    flowing = threading.Event()

    def load() -> None:
        client = fanin.client(timeout=60)
        while not stop.is_set():
            try:
                client.completions.create(model=model, prompt="hello there", max_tokens=4)
                ok.append(time.monotonic())
                if len(ok) >= 4:
                    flowing.set()
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                failed.append(type(e).__name__)  # only requests on the killed server may fail

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        assert flowing.wait(120), failed  # load is flowing before the kill
        assert not failed, failed
        os.kill(old_pid, signal.SIGSEGV)
        killed_at = time.monotonic()
        new_pid = None
        for _ in range(2000):  # until the replacement answers (fresh connections)
            response = get(fanin, "/ready")
            if response.headers.get("x-fanin-server") == "0" and response.status_code == 200:
                new_pid = fanin.server_pid(0)
                break
        assert new_pid is not None and new_pid != old_pid and not is_alive(old_pid)
        assert any(t > killed_at for t in ok)
    finally:
        stop.set()
        for w in workers:
            w.join()
    # At most the requests that were on the killed server (one per worker) failed.
    assert len(failed) <= len(workers), failed
    assert "Fatal Python error: Segmentation fault" in fanin.log()
    assert httpx.get(fanin.base_url + "/ready").status_code == 200


def test_metrics_report_each_servers_event_loop_lag(fanin: Fanin) -> None:
    text = get(fanin, "/metrics").text
    for server in ("0", "1"):
        assert f'fanin_event_loop_lag_seconds{{server="{server}"}}' in text
        counts = [
            line
            for line in text.splitlines()
            if line.startswith("fanin_event_loop_lag_distribution_seconds_count")
            and f'server="{server}"' in line
        ]
        assert counts and float(counts[0].rsplit(" ", 1)[1]) > 0  # ticks were observed
