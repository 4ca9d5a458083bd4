"""Hostile or corrupt frames: every one is a DecodeError, nothing else escapes."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ipc_samples import all_kinds, astronaut_patches, image_request, token_ids

from ipc import messages as m
from ipc.codec import DecodeError, Decoder, Encoder

Ext = msgspec.msgpack.Ext
ADD = bytes([m.Kind.ADD])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _array(dtype: Any, shape: Any, data: Any) -> Ext:
    return Ext(1, msgspec.msgpack.encode([dtype, shape, data]))


def _add(ids: Any, pixels: Any = None) -> bytes:
    """Body of an ADD with ``ids`` as prompt_token_ids and optionally one image item."""
    body: list[Any] = ["req", ids]
    if pixels is not None:
        body.append([["h", "image", [1, 2, 2], 0, 1, pixels]])
    return msgspec.msgpack.encode(body)


FOUR = b"\x01\x00\x00\x00"

HOSTILE: dict[str, list[Any]] = {
    "no frames": [],
    "kind only": [ADD],
    "empty kind": [b"", _add(_array("int32", [1], FOUR))],
    "two-byte kind": [ADD + ADD, _add(_array("int32", [1], FOUR))],
    "unknown kind": [b"\xff", _add(_array("int32", [1], FOUR))],
    "kind of the other direction": [bytes([m.Kind.OUTPUTS]), msgspec.msgpack.encode([[]])],
    "bad msgpack": [ADD, b"\xc1"],
    "truncated msgpack": [ADD, _add(_array("int32", [1], FOUR))[:-3]],
    "trailing bytes": [ADD, _add(_array("int32", [1], FOUR)) + b"\x00"],
    "wrong schema": [ADD, msgspec.msgpack.encode({"request_id": "x"})],
    "wrong field type": [ADD, msgspec.msgpack.encode([5, _array("int32", [1], FOUR)])],
    "int list instead of array": [ADD, _add([1, 2, 3])],
    "constraint violated": [
        ADD,
        msgspec.msgpack.encode(["r", _array("int32", [1], FOUR), [], [0]]),
    ],
    "unknown ext code": [ADD, _add(Ext(7, b"\x90"))],
    "bad ext payload": [ADD, _add(Ext(1, b"\xc1"))],
    "ext payload wrong shape": [ADD, _add(Ext(1, msgspec.msgpack.encode(["int32", [1]])))],
    "dtype not allowed": [ADD, _add(_array("object", [1], FOUR))],
    "bool dtype": [ADD, _add(_array("bool", [4], FOUR))],
    "negative dim": [ADD, _add(_array("int32", [-1], FOUR))],
    "rank 9": [ADD, _add(_array("int32", [1] * 9, FOUR))],
    "bool dim": [ADD, _add(_array("int32", [True], FOUR))],
    "inline too short": [ADD, _add(_array("int32", [2], FOUR))],
    "inline too long": [ADD, _add(_array("int32", [1], FOUR + FOUR))],
    "zero-size huge dims": [ADD, _add(_array("int32", [0, 2**63], b""))],
    "overflowing dims": [ADD, _add(_array("float32", [2**64 - 1] * 8, 0)), FOUR],
    "aux index out of range": [ADD, _add(_array("int32", [1], 1)), FOUR],
    "negative aux index": [ADD, _add(_array("int32", [1], -1)), FOUR],
    "aux too short": [ADD, _add(_array("int32", [2], 0)), FOUR],
    "aux used twice": [ADD, _add(_array("int32", [1], 0), _array("float32", [1], 0)), FOUR],
    "unused aux": [ADD, _add(_array("int32", [1], 0)), FOUR, FOUR],
    "bfloat16 into numpy field": [ADD, _add(_array("bfloat16", [2], FOUR))],
    "frame not a buffer": [ADD, 42],
    "deep nesting": [bytes([m.Kind.UTILITY_RESULT]), b"\x92\x01\x81\xa1k" + b"\x91" * 100_000],
}


@pytest.mark.parametrize("frames", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_frames_raise_decode_error(frames: list[Any]) -> None:
    dec = Decoder(m.TO_ENGINE) if frames[:1] != [b"\x06"] else Decoder(m.FROM_ENGINE)
    with pytest.raises(DecodeError):
        dec.decode(frames)


def test_valid_control_case_decodes() -> None:
    # The same building blocks as the hostile cases, assembled correctly.
    got = Decoder(m.TO_ENGINE).decode(
        [ADD, _add(_array("int32", [1], 0), _array("bfloat16", [2, 2], FOUR + FOUR)), FOUR]
    )
    assert got.prompt_token_ids.tolist() == [1]
    assert got.mm_items[0].pixel_values.shape == (2, 2)


def test_decoder_survives_errors() -> None:
    dec = Decoder(m.TO_ENGINE)
    good = Encoder().encode(image_request(astronaut_patches()))
    for frames in HOSTILE.values():
        with pytest.raises(DecodeError):
            dec.decode(frames)
        assert torch.equal(dec.decode(good).mm_items[0].pixel_values, astronaut_patches())


def _check(frames: list[Any], allowed: tuple[m.Kind, ...] = m.TO_ENGINE) -> None:
    """Decoding either fails with DecodeError or yields an allowed struct."""
    try:
        msg = Decoder(allowed).decode(frames)
    except DecodeError:
        return
    assert m.TYPE_KINDS[type(msg)] in allowed


_VALID = [Encoder().encode(msg) for msg in all_kinds()]
_VALID.append(
    Encoder().encode(
        m.EngineRequest(
            "r", token_ids(1000), [image_request(astronaut_patches()[:8]).mm_items[0]] * 2
        )
    )
)


@FUZZ
@given(
    kind=st.integers(0, 255),
    body=st.binary(max_size=256),
    aux=st.lists(st.binary(max_size=64), max_size=3),
)
def test_fuzz_random_body(kind: int, body: bytes, aux: list[bytes]) -> None:
    _check([bytes([kind]), body, *aux])
    _check([bytes([kind]), body, *aux], m.FROM_ENGINE)


@FUZZ
@given(frames=st.lists(st.binary(max_size=32), max_size=6))
def test_fuzz_random_frame_lists(frames: list[bytes]) -> None:
    _check(frames)


@st.composite
def _mutated(draw: st.DrawFn) -> list[bytes]:
    frames = [bytes(f) for f in draw(st.sampled_from(_VALID))]
    how = draw(st.sampled_from(["truncate", "flip", "swap", "drop", "add", "cut aux"]))
    if how == "truncate":
        frames[1] = frames[1][: draw(st.integers(0, len(frames[1]) - 1))]
    elif how == "flip":
        body = bytearray(frames[1])
        bit = draw(st.integers(0, len(body) * 8 - 1))
        body[bit // 8] ^= 1 << (bit % 8)
        frames[1] = bytes(body)
    elif how == "swap" and len(frames) > 3:
        frames[2], frames[3] = frames[3], frames[2]
    elif how == "drop" and len(frames) > 2:
        del frames[draw(st.integers(2, len(frames) - 1))]
    elif how == "add":
        frames.append(draw(st.binary(max_size=64)))
    elif how == "cut aux" and len(frames) > 2:
        i = draw(st.integers(2, len(frames) - 1))
        frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
    return frames


@FUZZ
@given(frames=_mutated())
def test_fuzz_mutated_valid_encodings(frames: list[bytes]) -> None:
    _check(frames, m.TO_ENGINE)
    _check(frames, m.FROM_ENGINE)


_DIM = st.one_of(st.integers(-3, 70), st.integers(-(2**63), 2**64 - 1))


@FUZZ
@given(
    dtype=st.sampled_from(["int32", "float32", "bfloat16", "uint8", "int64", "float", "", "<i4"]),
    shape=st.lists(_DIM, max_size=12),
    data=st.one_of(st.integers(-2, 3), st.binary(max_size=300)),
    aux=st.lists(st.binary(max_size=300), max_size=3),
)
def test_fuzz_array_headers(dtype: str, shape: list[int], data: Any, aux: list[bytes]) -> None:
    frames = [ADD, _add(_array("int32", [1], FOUR), _array(dtype, shape, data)), *aux]
    try:
        msg = Decoder(m.TO_ENGINE).decode(frames)
    except DecodeError:
        return
    pixels = msg.mm_items[0].pixel_values
    # Accepted only when the header describes exactly the bytes that came.
    raw = data if isinstance(data, bytes) else aux[data]
    assert list(pixels.shape) == shape and pixels.numel() * pixels.element_size() == len(raw)
    assert len(aux) == (0 if isinstance(data, bytes) else 1)


def test_decoded_token_ids_are_what_was_sent() -> None:
    ids = token_ids(1000)
    got = Decoder(m.TO_ENGINE).decode(Encoder().encode(m.EngineRequest("r", ids)))
    assert got.prompt_token_ids.dtype == np.int32 and np.array_equal(got.prompt_token_ids, ids)
