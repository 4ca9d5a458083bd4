"""Render worker processes (``--preprocess-mode process``) with the default model's tokenizer and
processor: a chat rendered by a worker equals the same chat rendered in-process, pixels (uint8
and bfloat16) and hashes included; concurrent and cancelled chats never mix up replies; the
client's errors come back as its ApiError; workers run under SCHED_IDLE; SIGTERM does not stop
a worker; a killed worker fails its request with 503, and a dead worker, busy or idle, is
reported lost and reaped; closing the sockets ends the workers, a chat in flight included.

The scenario runs in a fresh interpreter: workers are forked before any thread starts, as the
API server does, which the pytest process (with its thread pools) cannot promise. End to end
through `fanin serve --preprocess-mode process` and the real engine: tests/integration/
test_serve_render_workers.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, socket, sys, time
    from pathlib import Path

    import skimage.data
    import torch

    from apiserver.config import ServerConfig
    from apiserver.errors import ApiError
    from apiserver.media import MediaBytes
    from apiserver.render_workers import RenderWorkers, _recv, _send
    from apiserver.renderer import Renderer
    from tests.apiserver.test_renderer_images import CHAT, COFFEE, ROCKET, _jpeg, _ready

    model = Path(sys.argv[1])
    config = ServerConfig()
    pair = RenderWorkers.fork(2, config, "test", [])
    doomed = RenderWorkers.fork(1, config, "doomed", [])
    floats = RenderWorkers.fork(1, config, "floats", [])
    media = [MediaBytes(COFFEE), MediaBytes(ROCKET)]


    def same(got, want, dtype=torch.uint8):
        assert got.token_ids.dtype == want.token_ids.dtype
        assert (got.token_ids == want.token_ids).all()
        assert len(got.mm_items) == len(want.mm_items) == 2
        for g, w in zip(got.mm_items, want.mm_items, strict=True):
            assert (g.content_hash, g.grid_thw, g.offset, g.length) == (
                w.content_hash, w.grid_thw, w.offset, w.length)
            assert g.pixel_values.dtype == w.pixel_values.dtype == dtype
            assert torch.equal(g.pixel_values, w.pixel_values)


    # Every dtype the engine's wire takes crosses, float16 and empty tensors included.
    a, b = socket.socketpair()
    sent = [torch.arange(6, dtype=d).reshape(2, 3) for d in (torch.float16, torch.int64)]
    sent.append(torch.empty(0, 4, dtype=torch.bfloat16))
    _send(a, sent)
    for got, want in zip(_recv(b), sent, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    a.close(), b.close()

    async def main():
        ready = _ready(model, "uint8")
        lost = []
        await pair.start(ready, lost.append)
        await doomed.start(ready, lost.append)
        want = Renderer.load(str(model), ready, config, 1).chat_blocking(CHAT, media, True, 16)

        got, waited, took = await pair.chat(CHAT, media, True, 16)
        same(got, want)
        # bfloat16 pixels (no numpy dtype) cross as raw bytes too.
        ready16 = _ready(model, "bfloat16")
        await floats.start(ready16, lost.append)
        want16 = Renderer.load(str(model), ready16, config, 1).chat_blocking(CHAT, media, True, 16)
        same((await floats.chat(CHAT, media, True, 16))[0], want16, torch.bfloat16)
        floats.close()
        # Below the server in the scheduler's order: the engine's and the servers' loops go
        # first (SCHED_IDLE on Linux, where these tests run).
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the server stays where it was
        assert [os.sched_getscheduler(p) for p in pair.pids] == [os.SCHED_IDLE] * 2
        assert waited >= 0 and took > 0

        # Six at once over two workers, and one cancelled while a worker renders it.
        cancelled = asyncio.ensure_future(pair.chat(CHAT, media, True, 16))
        await asyncio.sleep(0.005)
        cancelled.cancel()
        results = await asyncio.gather(*(pair.chat(CHAT, media, True, 16) for _ in range(6)))
        for got, _, _ in results:
            same(got, want)

        # The client's error, as the in-process renderer raises it; the worker goes on.
        try:
            await pair.chat(CHAT, [MediaBytes(b"not an image"), media[1]], True, 16)
            raise SystemExit("a broken image rendered")
        except ApiError as exc:
            assert exc.status == 400, exc.message

        # systemd's stop signal reaches the workers too: they keep rendering while the
        # server drains.
        for pid in pair.pids:
            os.kill(pid, signal.SIGTERM)
        same((await pair.chat(CHAT, media, True, 16))[0], want)

        # A killed worker: its request fails with 503 and the loss is reported.
        os.kill(doomed.pids[0], signal.SIGKILL)
        try:
            await doomed.chat(CHAT, media, True, 16)
            raise SystemExit("a dead worker answered")
        except ApiError as exc:
            assert exc.status == 503, exc.message
        assert len(lost) == 1 and "render worker" in lost[0], lost
        # The cancelled chat's worker went on: no IO thread ended.
        assert len(pair._threads) == 2 and all(t.is_alive() for t in pair._threads)
        for _ in range(200):  # the exit watcher reaps it
            await asyncio.sleep(0.05)
            try:  # WNOWAIT: look without reaping
                os.waitid(os.P_PID, doomed.pids[0], os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
        else:
            raise SystemExit("the killed worker was left a zombie")
        assert len(lost) == 1, lost  # reported once
        assert not doomed._pidfds  # unwatched: an exited pid's pidfd stays readable

        # Closing with a chat in flight (the server's shutdown): the chat fails at once, no
        # IO thread stays blocked on its reply, and no loss is reported.
        big = MediaBytes(_jpeg(skimage.data.astronaut(), (2048, 2048)))  # ~100 ms or more
        inflight = asyncio.ensure_future(pair.chat(CHAT, [big, big], True, 16))
        await asyncio.sleep(0.02)
        pair.close()
        try:
            await asyncio.wait_for(inflight, 10)
            raise SystemExit("a chat outlived the close")
        except ApiError as exc:
            assert exc.status == 503, exc.message
        assert len(lost) == 1, lost

    asyncio.run(main())
    deadline = time.monotonic() + 20
    for pid in pair.pids:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, f"worker {pid} outlived its socket"
            time.sleep(0.02)
    print("ok")
    """
)


def test_workers_render_as_in_process_and_fail_cleanly(default_model_dir: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(default_model_dir)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
