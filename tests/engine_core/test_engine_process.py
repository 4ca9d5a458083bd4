"""``python -m engine_core`` as a real process on the default model, driven over ZeroMQ through
``ipc.transport`` the way API servers drive it."""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import skimage.data
import zmq
from conftest import image_request
from dealer import Client
from PIL import Image

from apiserver.launch.run_dir import engine_address, make_run_dir
from bench.datasets import sharegpt_prompts
from ipc import messages
from ipc.config import EngineConfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 16
#: A generation that cannot finish while a test runs: only an abort ends it.
LONG = 900


class EngineProcess:
    def __init__(self, model_dir: Path, **overrides: Any) -> None:
        self.run_dir = make_run_dir("fanin-test-")
        self.address = engine_address(self.run_dir)
        fields: dict[str, Any] = {
            "max_model_len": 1024,
            "max_num_seqs": 12,
            "max_num_batched_tokens": 64,
            "cpu_kv_cache_bytes": 64 << 20,
        }
        fields.update(overrides)
        config = EngineConfig(**fields)
        config_path = os.path.join(self.run_dir, "engine.json")
        with open(config_path, "wb") as f:
            f.write(msgspec.json.encode(config))
        cmd = [sys.executable, "-m", "engine_core", "--config", config_path]
        cmd += ["--model", str(model_dir), "--engine-address", self.address]
        cmd += ["--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, cwd=REPO)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture(scope="module")
def engine(default_model_dir: Path) -> Iterator[EngineProcess]:
    proc = EngineProcess(default_model_dir)
    yield proc
    proc.stop()


@pytest.fixture
def client(engine: EngineProcess, ctx: zmq.Context[Any]) -> Iterator[Client]:
    c = Client(ctx, engine.address, 0)
    try:
        c.hello()
        yield c
    finally:
        c.close()


def text_request(rid: str, ids: np.ndarray, **params: Any) -> messages.EngineRequest:
    sampling = messages.SamplingParams(**{"max_tokens": NEW_TOKENS, "temperature": 0.0, **params})
    return messages.EngineRequest(rid, np.asarray(ids, dtype=np.int32), sampling=sampling)


def tokens(outputs: list[messages.RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def hf_greedy(hf_model: Any, encoded: Any) -> list[int]:
    """HF generate, greedy; min_new_tokens masks EOS so both sides run the full length."""
    import torch

    inputs = {k: v for k, v in encoded.items() if k != "attention_mask"}
    with torch.no_grad():
        out = hf_model.generate(
            **inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
    return out[0, encoded["input_ids"].shape[1] :].tolist()


def test_greedy_batch_matches_hf_with_chunked_prefill(
    client: Client, hf_model: Any, encode: Callable[..., Any]
) -> None:
    texts = sharegpt_prompts(8, min_chars=40, max_chars=1500)
    prompts = [encode(t) for t in texts]
    prompts.append(encode("What is in the cup?", [Image.fromarray(skimage.data.coffee())]))
    image_id = hf_model.config.image_token_id
    requests = []
    for i, encoded in enumerate(prompts):
        req = image_request(f"g{i}", encoded, image_id)
        params = messages.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        requests.append(msgspec.structs.replace(req, sampling=params))
    lengths = [len(r.prompt_token_ids) for r in requests]
    assert max(lengths) > 64 * 3 and min(lengths) < 64  # prefill spans several steps
    assert requests[-1].mm_items and requests[-1].mm_items[0].length > 64
    for req in requests:
        client.send(req)
    got = client.collect({r.request_id for r in requests})
    for req, encoded in zip(requests, prompts, strict=True):
        outs = got[req.request_id]
        assert outs[-1].finish_reason == "length"
        assert outs[-1].num_prompt_tokens == len(req.prompt_token_ids)
        assert tokens(outs) == hf_greedy(hf_model, encoded), req.request_id


def test_bad_request_fails_alone(client: Client, default_model_dir: Path) -> None:
    vocab = json.loads((default_model_dir / "config.json").read_text())
    vocab_size = vocab.get("vocab_size") or vocab["text_config"]["vocab_size"]
    client.send(text_request("ok-1", np.arange(10, 50)))
    client.send(text_request("bad", np.array([5, vocab_size, 6])))
    client.send(text_request("ok-2", np.arange(100, 120)))
    client.send(text_request("too-long", np.arange(1, 1020), max_tokens=10))
    got = client.collect({"ok-1", "bad", "ok-2", "too-long"})
    for rid in ("bad", "too-long"):
        out = got[rid][-1]
        assert out.finish_reason == "error" and out.error is not None
        assert out.error.status == 400
    assert str(vocab_size) in got["bad"][-1].error.message  # type: ignore[union-attr]
    assert "1019" in got["too-long"][-1].error.message  # type: ignore[union-attr]
    for rid in ("ok-1", "ok-2"):
        assert len(tokens(got[rid])) >= 1 and got[rid][-1].error is None


def test_corrupt_frames_do_not_kill(client: Client) -> None:
    client.sock.send_multipart([bytes([messages.Kind.ADD]), b"\xc1\xc1 not msgpack"])
    client.sock.send_multipart([b"\xff", b""])
    client.sock.send_multipart([bytes([messages.Kind.READY]), b"\x90"])  # wrong direction
    assert client.utility("ping") == {"pong": True}


def test_seeded_sampling_reproducible(client: Client) -> None:
    prompt = np.arange(30, 70)
    params = {"temperature": 1.0, "top_p": 0.9, "seed": 2024, "ignore_eos": True}
    client.send(text_request("seed-a", prompt, **params))
    first = tokens(client.collect({"seed-a"})["seed-a"])
    # Second run shares its steps with unrelated sampled requests.
    client.send(text_request("noise-1", np.arange(3, 90), temperature=1.0, ignore_eos=True))
    client.send(text_request("seed-b", prompt, **params))
    client.send(text_request("noise-2", np.arange(7, 20), temperature=0.7, ignore_eos=True))
    second = tokens(client.collect({"seed-b", "noise-1", "noise-2"})["seed-b"])
    assert first == second and len(first) == NEW_TOKENS
    client.send(text_request("seed-c", prompt, **{**params, "seed": 7}))
    assert tokens(client.collect({"seed-c"})["seed-c"]) != first


def test_abort_frees_slot(client: Client) -> None:
    full = client.utility("stats")
    client.send(text_request("doomed", np.arange(1, 40), max_tokens=LONG, ignore_eos=True))
    client.wait_stats(lambda s: s["num_running"] == 1)
    client.send(messages.AbortRequests(["doomed", "never-existed"]))
    stats = client.wait_stats(lambda s: s["num_running"] == 0 and s["num_waiting"] == 0)
    assert stats["num_free_slots"] == full["num_free_slots"] == full["num_slots"]


def test_reconnect_with_hello_aborts_old_requests(
    engine: EngineProcess, ctx: zmq.Context[Any], client: Client
) -> None:
    old = Client(ctx, engine.address, 5)
    old.hello()
    old.send(text_request("orphan", np.arange(1, 30), max_tokens=LONG, ignore_eos=True))
    old.wait_stats(lambda s: s["num_running"] == 1)
    old.close()  # the API server died without a word
    new = Client(ctx, engine.address, 5)
    new.hello()
    stats = new.wait_stats(lambda s: s["num_running"] == 0)
    assert stats["num_free_slots"] == stats["num_slots"]
    new.close()


def test_heartbeat_when_idle(client: Client) -> None:
    while True:
        msg = client.recv()
        if isinstance(msg, messages.OutputBatch) and not msg.outputs:
            load = msg.load  # num_admitted counts what earlier tests ran on this engine
            assert (load.num_running, load.num_waiting, load.kv_usage) == (0, 0, 0.0)
            assert load.num_waiting_tokens == 0
            return


def _tgkill_other_thread(pid: int, signum: int) -> None:
    """Deliver ``signum`` to a thread of ``pid`` other than its main thread, as the kernel may
    do with a process-directed signal (torch and CUDA start many threads)."""
    syscall_nr = {"x86_64": 234, "aarch64": 131}[platform.machine()]
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, "the engine runs no other thread"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(syscall_nr, pid, tids[0], signum) == 0, ctypes.get_errno()


@pytest.mark.parametrize("how", ["shutdown", "sigterm", "sigterm_to_another_thread_when_idle"])
def test_stop_exits_zero(default_model_dir: Path, ctx: zmq.Context[Any], how: str) -> None:
    proc = EngineProcess(default_model_dir)
    try:
        c = Client(ctx, proc.address, 0)
        ready = c.hello()
        assert ready.engine_pid == proc.proc.pid and ready.supports_images
        # API servers load the tokenizer from READY's model directory.
        assert ready.model == str(default_model_dir)
        if how == "sigterm_to_another_thread_when_idle":
            # The busy loop sleeps on its inbox: only the IO thread can wake it.
            c.wait_stats(lambda s: s["num_running"] == 0)
            _tgkill_other_thread(proc.proc.pid, signal.SIGTERM)
        else:
            c.send(text_request("busy", np.arange(1, 30), max_tokens=LONG, ignore_eos=True))
            c.wait_stats(lambda s: s["num_running"] == 1)
            if how == "shutdown":
                c.send(messages.Shutdown("test"))
            else:
                proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
        c.close()
    finally:
        proc.stop()


def test_bad_images_fail_alone(
    default_model_dir: Path, ctx: zmq.Context[Any], encode: Callable[..., Any], hf_model: Any
) -> None:
    """Over the encoder budget, or a grid that disagrees with the pixel rows: a 400 for that
    request at admission; the others run, and nothing stays pinned."""
    proc = EngineProcess(default_model_dir, max_num_encoder_patches=64)
    try:
        c = Client(ctx, proc.address, 0)
        c.hello()
        image_id = hf_model.config.image_token_id
        coffee = Image.fromarray(skimage.data.coffee())
        big = image_request("big", encode("What is this?", [coffee.resize((224, 168))]), image_id)
        small = image_request("small", encode("And this?", [coffee.resize((56, 84))]), image_id)
        item = small.mm_items[0]
        assert math.prod(big.mm_items[0].grid_thw) > 64 >= math.prod(item.grid_thw)
        pixels = item.pixel_values
        assert pixels is not None
        skewed = msgspec.structs.replace(
            small,
            request_id="skewed",
            mm_items=[
                msgspec.structs.replace(item, content_hash="skewed", pixel_values=pixels[:-4])
            ],
        )
        for req in (big, small, skewed, text_request("text", np.arange(5, 30))):
            c.send(req)
        got = c.collect({"big", "small", "skewed", "text"})
        for rid, needle in (("big", "--max-num-encoder-patches"), ("skewed", "disagree with grid")):
            out = got[rid][-1]
            assert out.finish_reason == "error" and out.error is not None
            assert out.error.status == 400 and needle in out.error.message, out.error
        for rid in ("small", "text"):
            assert got[rid][-1].finish_reason == "length" and len(tokens(got[rid])) == NEW_TOKENS
        stats = c.utility("stats")
        assert stats["num_free_slots"] == stats["num_slots"] and stats["num_waiting"] == 0
        c.close()
    finally:
        proc.stop()
