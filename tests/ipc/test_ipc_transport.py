"""ROUTER/DEALER endpoints over ipc:// in a private run dir: routing, zero-copy, handshake."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio
from ipc_samples import all_kinds, assert_same, astronaut_patches, image_request

from apiserver.launch.run_dir import engine_address, make_run_dir
from ipc import messages as m
from ipc import transport as t
from ipc.codec import Decoder, Encoder

TIMEOUT_MS = 10_000
Connect = Callable[[int], zmq.Socket[Any]]


def _ready(**changes: Any) -> m.Ready:
    fields = dict(
        protocol_version=m.PROTOCOL_VERSION,
        model="tiny",
        max_model_len=4096,
        vocab_size=8192,
        kv_capacity_tokens=65536,
        max_num_seqs=64,
        supports_images=True,
        supports_embeddings=True,
        supports_generation=True,
        engine_pid=os.getpid(),
    )
    fields.update(changes)
    return m.Ready(**fields)  # type: ignore[arg-type]


@pytest.fixture
def run_dir() -> Iterator[str]:
    path = make_run_dir()
    yield path
    shutil.rmtree(path)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def engine(ctx: zmq.Context[Any], run_dir: str) -> Iterator[zmq.Socket[Any]]:
    sock = t.bind_engine_socket(ctx, engine_address(run_dir))
    yield sock
    sock.close()


@pytest.fixture
def connect(ctx: zmq.Context[Any], run_dir: str) -> Iterator[Connect]:
    """Connects client sockets to the engine address; closes them after the test (a socket
    dropped unclosed is a ResourceWarning, an error here)."""
    socks: list[zmq.Socket[Any]] = []

    def _connect(index: int) -> zmq.Socket[Any]:
        socks.append(t.connect_client_socket(ctx, engine_address(run_dir), index))
        return socks[-1]

    yield _connect
    for sock in socks:
        sock.close()


def _recv_routed(engine: zmq.Socket[Any]) -> tuple[bytes, Any]:
    assert engine.poll(TIMEOUT_MS), "nothing arrived"
    identity, frames = t.recv_routed(engine)
    return identity, Decoder(m.TO_ENGINE).decode(frames)


def test_client_identity() -> None:
    assert len({t.client_identity(i) for i in range(100)}) == 100
    assert not t.client_identity(0).startswith(b"\0")
    for bad in (-1, True, "1", 1.0):
        with pytest.raises(ValueError):
            t.client_identity(bad)  # type: ignore[arg-type]


def test_every_kind_over_router_dealer(connect: Connect, engine: Any) -> None:
    client = connect(5)
    enc = Encoder()
    from_engine = Decoder(m.FROM_ENGINE)
    for msg in all_kinds():
        if m.TYPE_KINDS[type(msg)] in m.TO_ENGINE:
            t.send(client, enc, msg)
            identity, got = _recv_routed(engine)
            assert identity == t.client_identity(5)
        else:
            t.send(engine, enc, msg, t.client_identity(5))
            assert client.poll(TIMEOUT_MS)
            got = t.recv(client, from_engine)
        assert_same(msg, got)


def test_received_arrays_are_views_of_zmq_frames(connect: Connect, engine: Any) -> None:
    client = connect(0)
    pixels = astronaut_patches().to(torch.bfloat16)
    msg = image_request(pixels)
    msg.prompt_token_ids = np.arange(1000, dtype=np.int32)
    t.send(client, Encoder(), msg)
    assert engine.poll(TIMEOUT_MS)
    _, frames = t.recv_routed(engine)
    got = Decoder(m.TO_ENGINE).decode(frames)
    ids_frame = np.frombuffer(frames[2].buffer, np.uint8)
    pixel_frame = np.frombuffer(frames[3].buffer, np.uint8)
    assert np.shares_memory(got.prompt_token_ids, ids_frame)
    ptr = got.mm_items[0].pixel_values.data_ptr()
    assert pixel_frame.ctypes.data <= ptr < pixel_frame.ctypes.data + pixel_frame.nbytes
    assert torch.equal(got.mm_items[0].pixel_values, pixels)


def test_router_mandatory_unknown_identity(engine: Any) -> None:
    with pytest.raises(zmq.ZMQError) as err:
        t.send(engine, Encoder(), m.OutputBatch([]), t.client_identity(99))
    assert err.value.errno == zmq.EHOSTUNREACH


def test_router_mandatory_after_client_left(connect: Connect, engine: Any) -> None:
    monitor = engine.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    client = connect(1)
    t.send(client, Encoder(), m.Hello(1, os.getpid()))
    identity, _ = _recv_routed(engine)
    t.send(engine, Encoder(), m.OutputBatch([]), identity)  # reachable while connected
    client.close()
    assert monitor.poll(TIMEOUT_MS), "no disconnect event"
    # The route goes away once the ROUTER has processed the pipe's termination, which its own
    # calls (send, poll) drive; until then a send may still vanish into the dying pipe.
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    with pytest.raises(zmq.ZMQError) as err:
        while time.monotonic() < deadline:
            t.send(engine, Encoder(), m.OutputBatch([]), identity)
            engine.poll(10)
    assert err.value.errno == zmq.EHOSTUNREACH
    engine.disable_monitor()
    monitor.close()


def test_router_handover_to_respawned_client(connect: Connect, engine: Any) -> None:
    old = connect(2)
    t.send(old, Encoder(), m.Hello(2, 111))
    _recv_routed(engine)
    new = connect(2)  # the respawned server, same index
    t.send(new, Encoder(), m.Hello(2, 222))
    identity, hello = _recv_routed(engine)
    assert identity == t.client_identity(2) and hello.pid == 222
    t.send(engine, Encoder(), m.EngineDead("bye"), identity)
    assert new.poll(TIMEOUT_MS)
    assert t.recv(new, Decoder(m.FROM_ENGINE)) == m.EngineDead("bye")
    assert not old.poll(0)


def _answer_hello(engine: zmq.Socket[Any], replies: list[msgspec.Struct]) -> threading.Thread:
    """A thread that waits for one HELLO and answers it with ``replies``."""

    def serve() -> None:
        identity, hello = _recv_routed(engine)
        assert isinstance(hello, m.Hello)
        for reply in replies:
            t.send(engine, Encoder(), reply, identity)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def test_handshake_skips_stale_outputs(connect: Connect, engine: Any) -> None:
    ready = _ready(eos_token_ids=[2])
    # Outputs for requests of a previous holder of this identity may still arrive first.
    thread = _answer_hello(engine, [m.OutputBatch([m.RequestOutput("old")]), ready])
    client = connect(0)
    got = t.handshake(client, Encoder(), Decoder(m.FROM_ENGINE), m.Hello(0, os.getpid()), 30)
    thread.join()
    assert got == ready


@pytest.mark.parametrize(
    ("reply", "match"),
    [(_ready(protocol_version=m.PROTOCOL_VERSION + 1), "protocol"), (m.EngineDead("OOM"), "OOM")],
)
def test_handshake_refuses(
    connect: Connect, engine: Any, reply: msgspec.Struct, match: str
) -> None:
    thread = _answer_hello(engine, [reply])
    client = connect(0)
    with pytest.raises(t.HandshakeError, match=match):
        t.handshake(client, Encoder(), Decoder(m.FROM_ENGINE), m.Hello(0, 1), 30)
    thread.join()


def test_handshake_times_out(connect: Connect, engine: Any) -> None:
    client = connect(0)
    with pytest.raises(TimeoutError, match="READY"):
        t.handshake(client, Encoder(), Decoder(m.FROM_ENGINE), m.Hello(0, 1), 0.2)


def test_async_handshake_and_messages(run_dir: str, engine: Any) -> None:
    thread = _answer_hello(engine, [_ready(), m.OutputBatch([m.RequestOutput("a", [7])])])

    async def client_side() -> tuple[m.Ready, Any]:
        actx = zmq.asyncio.Context()
        try:
            sock = t.connect_client_socket(actx, engine_address(run_dir), 3)
            ready = await t.ahandshake(
                sock, Encoder(), Decoder(m.FROM_ENGINE), m.Hello(3, os.getpid()), 30
            )
            batch = await t.arecv(sock, Decoder(m.FROM_ENGINE))
            await t.asend(sock, Encoder(), m.AbortRequests(["a"]))
            return ready, batch
        finally:
            actx.destroy(linger=0)

    ready, batch = asyncio.run(client_side())
    thread.join()
    assert ready == _ready() and batch.outputs[0].new_token_ids == [7]
    identity, abort = _recv_routed(engine)
    assert identity == t.client_identity(3) and abort == m.AbortRequests(["a"])


def _echo_engine(address: str) -> None:
    """A stand-in engine process: READY for HELLO; for each ADD, its prompt back as tokens
    and its first image's pixels (as float32) as the embedding; exits on SHUTDOWN."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = t.bind_engine_socket(ctx, address)
    enc, dec = Encoder(), Decoder(m.TO_ENGINE)
    try:
        while True:
            identity, frames = t.recv_routed(sock)
            msg = dec.decode(frames)
            if isinstance(msg, m.Shutdown):
                return
            if isinstance(msg, m.Hello):
                t.send(sock, enc, _ready(), identity)
            elif isinstance(msg, m.EngineRequest):
                pixels = msg.mm_items[0].pixel_values.float().numpy() if msg.mm_items else None
                out = m.RequestOutput(
                    msg.request_id, msg.prompt_token_ids.tolist(), embedding=pixels
                )
                t.send(sock, enc, m.OutputBatch([out]), identity)
    finally:
        ctx.destroy(linger=0)


@pytest.mark.slow
def test_two_processes(connect: Connect, run_dir: str) -> None:
    address = engine_address(run_dir)
    proc = multiprocessing.get_context("spawn").Process(target=_echo_engine, args=(address,))
    proc.start()
    try:
        client = connect(0)
        enc, dec = Encoder(), Decoder(m.FROM_ENGINE)
        # The handshake doubles as the readiness poll of the spawned engine.
        assert t.handshake(client, enc, dec, m.Hello(0, os.getpid()), 120) == _ready(
            engine_pid=proc.pid
        )
        for pixels in (astronaut_patches(), astronaut_patches().to(torch.bfloat16)):
            req = image_request(pixels)
            t.send(client, enc, req)
            assert client.poll(TIMEOUT_MS)
            out = t.recv(client, dec).outputs[0]
            assert out.new_token_ids == req.prompt_token_ids.tolist()
            assert torch.equal(torch.from_numpy(out.embedding.copy()), pixels.float())
        t.send(client, enc, m.Shutdown("test over"))
        proc.join(TIMEOUT_MS / 1000)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
