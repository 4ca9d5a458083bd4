"""Encode wire messages to ZeroMQ multipart frames and back, arrays without copies.

Frames: ``[kind byte][msgpack body][aux 0][aux 1]...``. An ``np.ndarray`` or ``torch.Tensor``
anywhere in a struct becomes a msgpack ``Ext`` whose payload is the msgpack array
``[dtype name, shape, data]``: ``data`` is either the index of the aux frame holding the raw
little-endian bytes (sent zero-copy) or, for arrays under ``INLINE_MAX_BYTES``, the bytes
themselves. Decoding maps the aux frames with ``np.frombuffer``/``torch.frombuffer`` (no copy)
and checks everything a hostile peer could get wrong before allocating anything; every problem
is a ``DecodeError``.

``Encoder`` and ``Decoder`` keep per-call state: use one of each per thread.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import numpy as np
import torch
import zmq

from ipc import messages

#: Arrays smaller than this travel inside the msgpack body instead of their own frame: a frame
#: costs more than copying a few hundred bytes.
INLINE_MAX_BYTES = 512
#: Highest array rank accepted from the wire.
MAX_RANK = 8

_ARRAY_EXT = 1
# Ext payload: (dtype name, shape, aux frame index or the inline bytes).
_ArrayHeader = tuple[str, tuple[int, ...], int | bytes]
# torch's warning for sharing a read-only buffer (frombuffer) or array (from_numpy).
_NOT_WRITABLE = "The given (buffer|NumPy array) is not writable"
if sys.byteorder != "little":  # torch tensors are sent in native byte order
    raise ImportError("fanin's wire format needs a little-endian host")

# dtype name -> (torch dtype, numpy dtype or None when numpy lacks it). The allowlist of
# everything a peer may send. No bool: a byte other than 0/1 would be an invalid bool.
_DTYPES: dict[str, tuple[torch.dtype, np.dtype[Any] | None]] = {
    "uint8": (torch.uint8, np.dtype("<u1")),
    "int8": (torch.int8, np.dtype("<i1")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int32": (torch.int32, np.dtype("<i4")),
    "int64": (torch.int64, np.dtype("<i8")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, None),
    "float32": (torch.float32, np.dtype("<f4")),
    "float64": (torch.float64, np.dtype("<f8")),
}
_TORCH_NAMES = {tdt: name for name, (tdt, _) in _DTYPES.items()}
_NUMPY_NAMES = {ndt: name for name, (_, ndt) in _DTYPES.items() if ndt is not None}

# Frames and buffers accepted by ``Decoder.decode``.
Buffer = bytes | bytearray | memoryview | zmq.Frame


_KIND_BYTES = {kind: bytes((kind,)) for kind in messages.Kind}


class DecodeError(ValueError):
    """Received frames are not a valid message for this socket."""


class Encoder:
    """Turns a wire struct into multipart frames. Build once, reuse (one per thread).

    The returned frames reference the arrays' memory: send them with ``copy=False`` and do not
    write to those arrays until ZeroMQ has sent them (pyzmq holds a reference to each buffer
    until libzmq is done, so the arrays themselves cannot be freed too early).
    """

    def __init__(self) -> None:
        self._msgpack = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._payload = msgspec.msgpack.Encoder()
        self._aux: list[bytes | memoryview] = []

    def encode(self, msg: msgspec.Struct) -> list[bytes | memoryview]:
        """Frames ``[kind, body, aux...]`` for ``msg`` (any struct of ``ipc.messages``)."""
        kind = messages.TYPE_KINDS.get(type(msg))
        if kind is None:
            raise TypeError(f"not a wire message: {type(msg).__name__}")
        self._aux = []
        try:
            body = self._msgpack.encode(msg)
            return [_KIND_BYTES[kind], body, *self._aux]
        finally:
            self._aux = []

    def _enc_hook(self, obj: Any) -> msgspec.msgpack.Ext:
        if isinstance(obj, torch.Tensor):
            name, shape, raw = tensor_bytes(obj)
        elif isinstance(obj, np.ndarray):
            name, shape, raw = _ndarray_bytes(obj)
        else:
            raise NotImplementedError(f"cannot encode {type(obj).__name__}")
        data: int | bytes
        if raw.nbytes < INLINE_MAX_BYTES:
            data = raw.tobytes()
        else:
            data = len(self._aux)
            self._aux.append(raw)
        return msgspec.msgpack.Ext(_ARRAY_EXT, self._payload.encode((name, shape, data)))


def tensor_bytes(t: torch.Tensor) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, raw bytes) of a tensor of a wire dtype; ``tensor_from_bytes``
    undoes it. TypeError for a dtype off the allowlist."""
    name = _TORCH_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"tensor dtype {t.dtype} cannot travel on the wire")
    t = t.detach().to("cpu").contiguous()
    # A flat byte view works for every dtype, including those numpy lacks (bfloat16).
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return name, tuple(t.shape), flat.data


def _ndarray_bytes(a: np.ndarray) -> tuple[str, tuple[int, ...], memoryview]:
    name = _NUMPY_NAMES.get(a.dtype.newbyteorder("<"))
    if name is None:
        raise TypeError(f"array dtype {a.dtype} cannot travel on the wire")
    wire = a.astype(a.dtype.newbyteorder("<"), copy=False)
    if not wire.flags.c_contiguous:
        wire = wire.copy(order="C")
    return name, a.shape, wire.reshape(-1).view(np.uint8).data


class Decoder:
    """Turns received frames back into a struct, accepting only ``kinds`` (one direction of
    a socket: ``messages.TO_ENGINE`` or ``messages.FROM_ENGINE``). Build once, reuse (one per
    thread). Decoded arrays are views of the received frames, not copies."""

    def __init__(self, kinds: Iterable[messages.Kind]) -> None:
        self._decoders = {
            int(kind): msgspec.msgpack.Decoder(
                messages.KIND_TYPES[kind], dec_hook=_dec_hook, ext_hook=self._ext_hook
            )
            for kind in kinds
        }
        self._payload = msgspec.msgpack.Decoder(_ArrayHeader)
        self._aux: list[memoryview] = []
        self._used: list[bool] = []

    def decode(self, frames: Sequence[Buffer]) -> Any:
        """The struct carried by ``frames`` (``[kind, body, aux...]``, no routing identity);
        raises ``DecodeError`` for anything malformed or not allowed on this socket."""
        if len(frames) < 2:
            raise DecodeError(f"expected at least 2 frames, got {len(frames)}")
        kind_frame = _view(frames[0])
        if len(kind_frame) != 1:
            raise DecodeError(f"kind frame must be 1 byte, got {len(kind_frame)}")
        decoder = self._decoders.get(kind_frame[0])
        if decoder is None:
            raise DecodeError(f"message kind {kind_frame[0]} not accepted on this socket")
        self._aux = [_view(f) for f in frames[2:]]
        self._used = [False] * len(self._aux)
        try:
            msg = decoder.decode(_view(frames[1]))
        except DecodeError:
            raise
        except (msgspec.DecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
            # msgspec.DecodeError covers bad msgpack, schema and Meta constraint violations;
            # RecursionError comes from absurdly nested data in untyped (Any) fields.
            raise DecodeError(str(exc)) from exc
        finally:
            self._aux = []
        if not all(self._used):
            raise DecodeError("message has aux frames that no array refers to")
        return msg

    def _ext_hook(self, code: int, data: memoryview) -> np.ndarray | torch.Tensor:
        if code != _ARRAY_EXT:
            raise DecodeError(f"unknown msgpack extension code {code}")
        try:
            name, shape, ref = self._payload.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"bad array header: {exc}") from exc
        if name not in _DTYPES:
            raise DecodeError(f"array dtype {name!r} not allowed")
        torch_dtype, np_dtype = _DTYPES[name]
        if len(shape) > MAX_RANK:
            raise DecodeError(f"array rank {len(shape)} exceeds {MAX_RANK}")
        if any(d < 0 for d in shape):
            raise DecodeError(f"negative dimension in shape {shape}")
        buf = bytearray(ref) if isinstance(ref, bytes) else self._take_aux(ref)
        # Python ints: no overflow whatever the peer claims.
        nbytes = math.prod(shape) * torch_dtype.itemsize
        if nbytes != len(buf):
            raise DecodeError(f"shape {shape} of {name} needs {nbytes} bytes, got {len(buf)}")
        try:
            if np_dtype is not None:
                array: np.ndarray = np.frombuffer(buf, dtype=np_dtype).reshape(shape)
                return array
            return _frombuffer(buf, torch_dtype).reshape(shape)
        except (ValueError, RuntimeError, OverflowError) as exc:  # e.g. (0, 2**70)
            raise DecodeError(f"unusable shape {shape}: {exc}") from exc

    def _take_aux(self, index: int) -> memoryview:
        if not 0 <= index < len(self._aux):
            raise DecodeError(f"aux frame {index} does not exist ({len(self._aux)} sent)")
        if self._used[index]:
            raise DecodeError(f"aux frame {index} referenced twice")
        self._used[index] = True
        return self._aux[index]


def _dec_hook(typ: type, obj: Any) -> Any:
    """Give a field typed ``np.ndarray`` or ``torch.Tensor`` the type it asks for."""
    if typ is torch.Tensor and isinstance(obj, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
            return torch.from_numpy(obj)
    if typ is np.ndarray and isinstance(obj, torch.Tensor):
        raise DecodeError(f"{obj.dtype} array cannot be a numpy array")
    if isinstance(obj, typ):
        return obj
    raise DecodeError(f"expected an array, got {type(obj).__name__}")


def tensor_from_bytes(name: str, shape: tuple[int, ...], buf: bytearray) -> torch.Tensor:
    """The tensor ``tensor_bytes`` described, as a view of ``buf``."""
    return _frombuffer(buf, _DTYPES[name][0]).reshape(shape)


def _frombuffer(buf: bytearray | memoryview, dtype: torch.dtype) -> torch.Tensor:
    if len(buf) == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # Frames from pyzmq are writable; bytes handed in by tests or tools are not. Sharing
        # them is the point, and receivers treat decoded arrays as read-only.
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
        return torch.frombuffer(buf, dtype=dtype)


def _view(frame: Buffer) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    if isinstance(frame, bytes | bytearray | memoryview):
        view = memoryview(frame)
        if view.ndim == 1 and view.itemsize == 1:
            return view
        if view.c_contiguous:
            return view.cast("B")
    raise DecodeError(f"frame of type {type(frame).__name__} is not a contiguous buffer")
