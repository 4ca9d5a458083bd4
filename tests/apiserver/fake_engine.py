"""A stand-in engine process speaking the real wire protocol over a real ipc:// socket.

It "generates" by echoing the prompt's text tokens back, one token per step and cycling,
so tests choose the output by choosing the prompt. Pooling requests get a deterministic unit
vector. Every ADD and ABORT is appended to ``--log`` (one line each, flushed) so tests can see
what the engine received. SIGUSR1 makes it send ENGINE_DEAD to every client and exit; tests
kill it outright for a silent death.

Run: ``python fake_engine.py --address ipc://... --model DIR [--step-s S] [--waiting N]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipc import messages, transport  # noqa: E402
from ipc.codec import DecodeError, Decoder, Encoder  # noqa: E402

EMBED_DIM = 8
MAX_MODEL_LEN = 512


@dataclass
class _Running:
    client: bytes
    request: messages.EngineRequest
    source: list[int]
    produced: int = 0


class FakeEngine:
    def __init__(self, args: argparse.Namespace) -> None:
        config = json.loads((Path(args.model) / "config.json").read_text())
        self.image_token_id = int(config["image_token_id"])
        self.ready = messages.Ready(
            protocol_version=messages.PROTOCOL_VERSION,
            model=args.model,
            max_model_len=MAX_MODEL_LEN,
            vocab_size=int(config.get("text_config", config).get("vocab_size", 8192)),
            kv_capacity_tokens=MAX_MODEL_LEN * 4,
            max_num_seqs=4,
            supports_images=True,
            supports_embeddings=True,
            supports_generation=True,
            eos_token_ids=[],
            engine_pid=os.getpid(),
            pixel_dtype="bfloat16",
            image_token_id=self.image_token_id,
        )
        self.step_s = args.step_s
        self.load = messages.EngineLoad(num_waiting=args.waiting)
        self.ctx = zmq.Context()
        self.sock = transport.bind_engine_socket(self.ctx, args.address)
        self.encoder = Encoder()
        self.decoder = Decoder(messages.TO_ENGINE)
        self.log = open(args.log, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
        self.clients: set[bytes] = set()
        self.running: dict[str, _Running] = {}
        self.should_die = False

    def run(self) -> None:
        last_beat = time.monotonic()
        while not self.should_die:
            timeout_ms = int(self.step_s * 1000) if self.running else 200
            if self.sock.poll(timeout_ms):
                while self.sock.poll(0):
                    self._receive()
            self._step()
            if time.monotonic() - last_beat >= 1.0:
                for client in list(self.clients):
                    self._send(client, messages.OutputBatch([], self.load))
                last_beat = time.monotonic()
        for client in list(self.clients):
            self._send(client, messages.EngineDead("killed on command"))
        self.sock.close(linger=1000)
        self.ctx.term()

    def _receive(self) -> None:
        client, frames = transport.recv_routed(self.sock)
        try:
            msg = self.decoder.decode(frames)
        except DecodeError as exc:
            self.log.write(f"BAD {exc}\n")
            return
        if isinstance(msg, messages.Hello):
            self.clients.add(client)
            self._send(client, self.ready)
        elif isinstance(msg, messages.EngineRequest):
            self._add(client, msg)
        elif isinstance(msg, messages.AbortRequests):
            for rid in msg.request_ids:
                self.log.write(f"ABORT {rid}\n")
                self.running.pop(rid, None)

    def _add(self, client: bytes, req: messages.EngineRequest) -> None:
        ids = [int(t) for t in req.prompt_token_ids]
        images = " ".join(
            f"{m.content_hash[:12]}:{m.offset}:{m.length}:"
            f"{None if m.pixel_values is None else m.pixel_values.dtype}"
            for m in req.mm_items
        )
        self.log.write(f"ADD {req.request_id} tokens={len(ids)} images=[{images}]\n")
        if req.pooling is not None:
            vec = np.sin(np.arange(1, EMBED_DIM + 1) * (sum(ids) % 97 + 1)).astype(np.float32)
            out = messages.RequestOutput(
                req.request_id,
                finish_reason="stop",
                num_prompt_tokens=len(ids),
                embedding=vec / np.linalg.norm(vec),
            )
            self._send(client, messages.OutputBatch([out], self.load))
            return
        source = [t for t in ids if t != self.image_token_id] or [0]
        self.running[req.request_id] = _Running(client, req, source)

    def _step(self) -> None:
        batches: dict[bytes, list[messages.RequestOutput]] = {}
        for rid, run in list(self.running.items()):
            sampling = run.request.sampling
            assert sampling is not None
            token = run.source[run.produced % len(run.source)]
            run.produced += 1
            reason = None
            if token in sampling.stop_token_ids:
                reason = "stop"
            elif run.produced >= sampling.max_tokens:
                reason = "length"
            logprobs = None
            if sampling.logprobs is not None:
                k = sampling.logprobs
                logprobs = [messages.TokenLogprobs(-0.25, [token] * k, [-0.25] * k)]
            out = messages.RequestOutput(
                rid,
                [token],
                reason,
                num_prompt_tokens=len(run.request.prompt_token_ids),
                logprobs=logprobs,
            )
            batches.setdefault(run.client, []).append(out)
            if reason is not None:
                del self.running[rid]
        for client, outs in batches.items():
            self._send(client, messages.OutputBatch(outs, self.load))

    def _send(self, client: bytes, msg: messages._Msg) -> None:
        try:
            transport.send(self.sock, self.encoder, msg, identity=client)
        except zmq.ZMQError:
            self.clients.discard(client)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--step-s", type=float, default=0.002)
    p.add_argument("--waiting", type=int, default=0)
    engine = FakeEngine(p.parse_args())

    def die(signum: int, frame: object) -> None:
        engine.should_die = True

    signal.signal(signal.SIGUSR1, die)
    engine.run()
    sys.exit(1 if engine.should_die else 0)


if __name__ == "__main__":
    main()
