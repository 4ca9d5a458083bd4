"""Encode/decode round trips of every wire message, arrays zero-copy both ways."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from ipc_samples import all_kinds, assert_same, astronaut_patches, image_request, token_ids

from ipc import messages as m
from ipc.codec import INLINE_MAX_BYTES, DecodeError, Decoder, Encoder


def _decoder_for(msg: msgspec.Struct) -> Decoder:
    kind = m.TYPE_KINDS[type(msg)]
    return Decoder(m.TO_ENGINE if kind in m.TO_ENGINE else m.FROM_ENGINE)


def _address(buf: Any) -> tuple[int, int]:
    """(start, end) address of a buffer's memory."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr.ctypes.data, arr.ctypes.data + arr.nbytes


def _inside(ptr: int, buf: Any) -> bool:
    start, end = _address(buf)
    return start <= ptr < end


def test_samples_cover_every_kind() -> None:
    assert {m.TYPE_KINDS[type(msg)] for msg in all_kinds()} == set(m.Kind)
    assert set(m.TO_ENGINE) | set(m.FROM_ENGINE) == set(m.Kind)
    assert not set(m.TO_ENGINE) & set(m.FROM_ENGINE)


@pytest.mark.parametrize("msg", all_kinds(), ids=lambda msg: type(msg).__name__)
def test_round_trip_every_kind(msg: msgspec.Struct) -> None:
    frames = Encoder().encode(msg)
    assert frames[0] == bytes([m.TYPE_KINDS[type(msg)]])
    # bytes frames: what a test or a tool would hand in, read-only.
    assert_same(msg, _decoder_for(msg).decode([bytes(f) for f in frames]))


def test_ready_decodes_across_the_field_added_last() -> None:
    """A field added at the end of an array-like struct (READY's ``uint8_one_frame``): a peer
    of the release before, whose READY lacks it or which knows no such field, still reads it."""
    ready = next(msg for msg in all_kinds() if isinstance(msg, m.Ready))
    assert msgspec.structs.fields(m.Ready)[-1].name == "uint8_one_frame"
    body = msgspec.msgpack.decode(msgspec.msgpack.encode(ready))
    older = msgspec.msgpack.encode(body[:-1])  # READY as the release before sent it
    assert msgspec.msgpack.decode(older, type=m.Ready) == msgspec.structs.replace(
        ready, uint8_one_frame=False
    )
    fields = [(f.name, f.type, f.default) for f in msgspec.structs.fields(m.Ready)[:-1]]
    before = msgspec.defstruct("Ready", fields, bases=(m._Msg,))
    got = msgspec.msgpack.decode(msgspec.msgpack.encode(ready), type=before)
    assert got.image_token_id == ready.image_token_id and got.pixel_dtype == "uint8"


def test_kind_must_match_socket_direction() -> None:
    hello = Encoder().encode(m.Hello(0, 1))
    outputs = Encoder().encode(m.OutputBatch([]))
    with pytest.raises(DecodeError, match="not accepted"):
        Decoder(m.FROM_ENGINE).decode(hello)
    with pytest.raises(DecodeError, match="not accepted"):
        Decoder(m.TO_ENGINE).decode(outputs)


TENSOR_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float64,
]


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return t.to(dtype)
    return (t * 40).round().clamp(-128 if dtype.is_signed else 0, 127).to(dtype)


def _views(base: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "frame": base,
        "inline": base[:1, :3],
        "empty": base[:0],
        "0-d": base[1, 2],
        "transposed": base.t(),
        "strided": base[::3, 5::7],
    }


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
@pytest.mark.parametrize("view", list(_views(torch.zeros(2, 3))))
def test_tensor_round_trip(dtype: torch.dtype, view: str) -> None:
    tensor = _views(_as_dtype(astronaut_patches(), dtype))[view]
    msg = image_request(tensor)
    frames = Encoder().encode(msg)
    got = Decoder(m.TO_ENGINE).decode(frames).mm_items[0].pixel_values
    assert isinstance(got, torch.Tensor)
    assert got.dtype == dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    big = tensor.numel() * tensor.element_size() >= INLINE_MAX_BYTES
    # 1 token-id frame (40 int32 = 160 bytes is inline) + 1 pixel frame when large.
    assert len(frames) == 2 + big


def test_empty_patch_tensor_keeps_shape() -> None:
    empty = torch.zeros(0, 1176, dtype=torch.bfloat16)
    got = Decoder(m.TO_ENGINE).decode(Encoder().encode(image_request(empty)))
    assert got.mm_items[0].pixel_values.shape == (0, 1176)


def test_encode_is_zero_copy_for_contiguous_arrays() -> None:
    pixels = astronaut_patches()
    ids = token_ids(1000)
    msg = image_request(pixels)
    msg.prompt_token_ids = ids
    _, _, ids_frame, pixel_frame = Encoder().encode(msg)
    assert np.frombuffer(ids_frame, np.uint8).ctypes.data == ids.ctypes.data
    assert np.frombuffer(pixel_frame, np.uint8).ctypes.data == pixels.data_ptr()


def test_decode_is_zero_copy() -> None:
    msg = image_request(astronaut_patches().to(torch.bfloat16))
    msg.prompt_token_ids = token_ids(1000)
    kind, body, ids_frame, pixel_frame = Encoder().encode(msg)
    # bytearray: the writable buffers pyzmq hands out with copy=False.
    received = [bytearray(f) for f in (kind, body, ids_frame, pixel_frame)]
    got = Decoder(m.TO_ENGINE).decode(received)
    ids = got.prompt_token_ids
    assert not ids.flags.owndata and np.shares_memory(ids, np.frombuffer(received[2], np.uint8))
    assert _inside(got.mm_items[0].pixel_values.data_ptr(), received[3])


def test_numpy_round_trips() -> None:
    ids = token_ids(1000)
    cases = {
        "strided ids": ids[::2],
        "big-endian ids": ids.astype(">i4"),
        "2-d float": np.arange(12, dtype=np.float64).reshape(3, 4).T,
        "empty": np.zeros(0, np.int32),
        "0-d": np.array(5, np.int32),
    }
    dec = Decoder(m.TO_ENGINE)
    for name, arr in cases.items():
        got = dec.decode(Encoder().encode(m.EngineRequest(name, arr))).prompt_token_ids
        assert got.shape == arr.shape and np.array_equal(got, arr), name
        assert got.dtype == arr.dtype.newbyteorder("<"), name


def test_arrays_in_untyped_fields_decode_as_arrays() -> None:
    result = m.UtilityResult(1, result={"hist": np.arange(300, dtype=np.int64)})
    got = Decoder(m.FROM_ENGINE).decode(Encoder().encode(result))
    assert np.array_equal(got.result["hist"], np.arange(300))


def test_bfloat16_cannot_fill_a_numpy_field() -> None:
    frames = Encoder().encode(m.EngineRequest("r", torch.zeros(300, dtype=torch.bfloat16)))
    with pytest.raises(DecodeError, match="numpy"):
        Decoder(m.TO_ENGINE).decode(frames)


def test_numpy_field_may_come_as_tensor_and_back() -> None:
    # A tensor fills an ndarray field on the wire (same bytes); a numpy array fills a tensor one.
    frames = Encoder().encode(m.EngineRequest("r", torch.arange(200, dtype=torch.int32)))
    got = Decoder(m.TO_ENGINE).decode(frames).prompt_token_ids
    assert isinstance(got, np.ndarray) and np.array_equal(got, np.arange(200))
    frames = Encoder().encode(image_request(astronaut_patches().numpy()))
    pixels = Decoder(m.TO_ENGINE).decode(frames).mm_items[0].pixel_values
    assert isinstance(pixels, torch.Tensor) and torch.equal(pixels, astronaut_patches())


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(4, dtype=torch.complex64),
        torch.zeros(4, dtype=torch.bool),
        np.array(["a", "b"], dtype=object),
        np.zeros(3, dtype=[("x", "i4")]),
    ],
    ids=["complex", "bool", "object", "structured"],
)
def test_encoder_rejects_unsupported_dtypes(bad: Any) -> None:
    with pytest.raises(TypeError, match="cannot travel"):
        Encoder().encode(m.EngineRequest("r", bad))


def test_encoder_rejects_foreign_structs() -> None:
    class NotAMessage(msgspec.Struct):
        x: int = 1

    with pytest.raises(TypeError, match="not a wire message"):
        Encoder().encode(NotAMessage())


def test_encoder_is_reusable_and_leaves_no_state() -> None:
    enc = Encoder()
    first = enc.encode(image_request(astronaut_patches()))
    second = enc.encode(m.Hello(0, 1))
    assert len(first) == 3 and len(second) == 2
    with pytest.raises(TypeError):
        enc.encode(m.EngineRequest("r", torch.zeros(400, dtype=torch.complex64)))
    assert len(enc.encode(image_request(astronaut_patches()))) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_moved_to_cpu() -> None:
    pixels = astronaut_patches().to(torch.bfloat16).cuda()
    got = Decoder(m.TO_ENGINE).decode(Encoder().encode(image_request(pixels)))
    assert torch.equal(got.mm_items[0].pixel_values, pixels.cpu())
