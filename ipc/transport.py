"""ZeroMQ endpoints between the API servers (DEALER each) and the engine core (ROUTER).

The engine binds one ROUTER on ``ipc://<private run dir>/engine.sock`` (the launcher makes
the run dir and the address: ``apiserver.launch.run_dir``); API server ``i``
connects a DEALER whose routing identity is ``client_identity(i)``, so the engine routes its
outputs by the socket a request came in on, never by anything a client wrote in a message.
Sync helpers serve the engine's IO thread (and the tests' stand-in clients); the ``a*`` twins
serve API servers on ``zmq.asyncio``. The protocol logic they share lives in plain functions.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from ipc import messages
from ipc.codec import Decoder, Encoder


class HandshakeError(ConnectionError):
    """The engine answered HELLO with something other than a compatible READY."""


def client_identity(index: int) -> bytes:
    """ZeroMQ routing identity of API server ``index`` (never starts with a NUL byte, which
    ZeroMQ reserves)."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"client index must be a non-negative int, got {index!r}")
    return b"api-%d" % index


def bind_engine_socket(ctx: zmq.Context[Any], address: str) -> zmq.Socket[Any]:
    """The engine's ROUTER, bound to ``address``.

    ROUTER_MANDATORY makes a send to a gone client raise ``zmq.ZMQError`` (EHOSTUNREACH)
    instead of dropping it silently, so the engine can abort that client's requests.
    ROUTER_HANDOVER lets a respawned API server with the same identity take over the route.
    No high-water marks: dropping outputs would hang requests.
    """
    sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_client_socket(
    ctx: zmq.Context[Any] | zmq.asyncio.Context, address: str, index: int
) -> Any:
    """API server ``index``'s DEALER connected to the engine; an asyncio socket when ``ctx``
    is a ``zmq.asyncio.Context``."""
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.IDENTITY, client_identity(index))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _frames(encoder: Encoder, msg: msgspec.Struct, identity: bytes | None) -> list[Any]:
    frames: list[Any] = encoder.encode(msg)
    return frames if identity is None else [identity, *frames]


def send(
    sock: zmq.Socket[Any], encoder: Encoder, msg: msgspec.Struct, identity: bytes | None = None
) -> None:
    """Send ``msg`` zero-copy; ``identity`` routes it on a ROUTER. On a ROUTER a gone
    ``identity`` raises ``zmq.ZMQError`` (EHOSTUNREACH)."""
    sock.send_multipart(_frames(encoder, msg, identity), copy=False)


async def asend(
    sock: zmq.asyncio.Socket,
    encoder: Encoder,
    msg: msgspec.Struct,
    identity: bytes | None = None,
) -> None:
    """``send`` for a ``zmq.asyncio`` socket."""
    await sock.send_multipart(_frames(encoder, msg, identity), copy=False)


def recv(sock: zmq.Socket[Any], decoder: Decoder) -> Any:
    """Receive and decode one message on a DEALER (raises ``DecodeError`` if malformed)."""
    return decoder.decode(sock.recv_multipart(copy=False))


async def arecv(sock: zmq.asyncio.Socket, decoder: Decoder) -> Any:
    """``recv`` for a ``zmq.asyncio`` socket."""
    return decoder.decode(await sock.recv_multipart(copy=False))


def recv_routed(sock: zmq.Socket[Any]) -> tuple[bytes, list[zmq.Frame]]:
    """Receive on a ROUTER: ``(sender identity, frames to decode)``. Decoding is left to the
    caller so that a malformed message can still be blamed on its sender."""
    identity, *frames = sock.recv_multipart(copy=False)
    return identity.bytes, frames


def _handshake_reply(msg: Any) -> messages.Ready | None:
    """The READY in ``msg``, None for a message to skip (outputs still routed to a previous
    holder of our identity), or HandshakeError."""
    if isinstance(msg, messages.EngineDead):
        raise HandshakeError(f"engine is dead: {msg.reason}")
    if not isinstance(msg, messages.Ready):
        return None
    if msg.protocol_version != messages.PROTOCOL_VERSION:
        raise HandshakeError(
            f"engine speaks protocol {msg.protocol_version}, "
            f"this server {messages.PROTOCOL_VERSION}"
        )
    return msg


def _remaining_ms(deadline: float, timeout_s: float) -> int:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"no READY from the engine within {timeout_s:g} s")
    return max(1, int(left * 1000))


def handshake(
    sock: zmq.Socket[Any],
    encoder: Encoder,
    decoder: Decoder,
    hello: messages.Hello,
    timeout_s: float,
) -> messages.Ready:
    """Send HELLO on a client socket and wait for READY; ``TimeoutError`` if none comes in
    ``timeout_s``, ``HandshakeError`` if the engine is dead or incompatible."""
    deadline = time.monotonic() + timeout_s
    send(sock, encoder, hello)
    while True:
        if sock.poll(_remaining_ms(deadline, timeout_s)):
            ready = _handshake_reply(recv(sock, decoder))
            if ready is not None:
                return ready


async def ahandshake(
    sock: zmq.asyncio.Socket,
    encoder: Encoder,
    decoder: Decoder,
    hello: messages.Hello,
    timeout_s: float,
) -> messages.Ready:
    """``handshake`` for a ``zmq.asyncio`` socket."""
    deadline = time.monotonic() + timeout_s
    await asend(sock, encoder, hello)
    while True:
        if await sock.poll(_remaining_ms(deadline, timeout_s)):
            ready = _handshake_reply(await arecv(sock, decoder))
            if ready is not None:
                return ready
