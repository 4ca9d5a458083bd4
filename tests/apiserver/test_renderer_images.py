"""The renderer's image path in-process, with the default model's tokenizer and processor:
uint8 patches straight from the processor travel to the socket without a copy, float ones
in the dtype READY asks for; the content hash comes from the image file's bytes and the
processor settings, not from the pixels."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

from apiserver.config import ServerConfig
from apiserver.errors import ApiError
from apiserver.media import MediaBytes
from apiserver.renderer import Prompt, Renderer
from bench.datasets import sharegpt_prompts
from ipc import messages
from ipc.codec import Encoder

CHAT = [
    {
        "role": "user",
        "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "compare"}],
    }
]


def _jpeg(array: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").resize(size).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


COFFEE = _jpeg(skimage.data.coffee(), (320, 240))
ROCKET = _jpeg(skimage.data.rocket(), (256, 192))


def _ready(model: Path, pixel_dtype: str, one_frame: bool = False) -> messages.Ready:
    config = json.loads((model / "config.json").read_text())
    return messages.Ready(
        protocol_version=messages.PROTOCOL_VERSION,
        model=str(model),
        max_model_len=8192,
        vocab_size=int(config["text_config"]["vocab_size"]),
        kv_capacity_tokens=8192,
        max_num_seqs=4,
        supports_images=True,
        supports_embeddings=True,
        supports_generation=True,
        pixel_dtype=pixel_dtype,  # type: ignore[arg-type]
        uint8_one_frame=one_frame,
        image_token_id=int(config["image_token_id"]),
    )


def _renderer(
    model: Path, pixel_dtype: str, processor: Any = None, one_frame: bool = False
) -> Renderer:
    return Renderer(
        AutoTokenizer.from_pretrained(model),
        processor or AutoProcessor.from_pretrained(model),
        _ready(model, pixel_dtype, one_frame),
        ServerConfig(),
        1,
    )


def _render(renderer: Renderer, *media: MediaBytes) -> Prompt:
    try:
        return renderer.chat_blocking(CHAT, list(media), True, 16)
    finally:
        renderer.close()


@pytest.mark.parametrize("one_frame", [False, True])
def test_uint8_patches_reach_the_wire_without_a_copy(
    default_model_dir: Path, one_frame: bool
) -> None:
    renderer = _renderer(default_model_dir, "uint8", one_frame=one_frame)
    prompt = _render(renderer, MediaBytes(COFFEE), MediaBytes(ROCKET))
    first, second = (item.pixel_values for item in prompt.mm_items)
    assert first is not None and second is not None
    assert first.dtype == second.dtype == torch.uint8
    # Both images are views of the processor's one output tensor...
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    assert second.data_ptr() == first.data_ptr() + first.numel()
    # ...and the encoder's frames are views of them in turn (pyzmq sends them with copy=False).
    request = messages.EngineRequest("r", prompt.token_ids, prompt.mm_items)
    frames = Encoder().encode(request)
    pointers = {np.frombuffer(f, np.uint8).ctypes.data for f in frames[2:] if len(f) > 1000}
    assert pointers >= {first.data_ptr(), second.data_ptr()}


def test_float_pixels_take_the_dtype_ready_asks_for(default_model_dir: Path) -> None:
    prompt = _render(
        _renderer(default_model_dir, "bfloat16"), MediaBytes(COFFEE), MediaBytes(ROCKET)
    )
    uint8 = _render(_renderer(default_model_dir, "uint8"), MediaBytes(COFFEE), MediaBytes(ROCKET))
    for item, raw in zip(prompt.mm_items, uint8.mm_items, strict=True):
        assert item.pixel_values is not None and raw.pixel_values is not None
        assert item.pixel_values.dtype == torch.bfloat16
        assert item.pixel_values.shape == raw.pixel_values.shape
        assert item.grid_thw == raw.grid_thw


def test_content_hash_is_of_the_bytes_and_the_settings(
    default_model_dir: Path, tmp_path: Path
) -> None:
    renderer = _renderer(default_model_dir, "uint8")
    b64 = MediaBytes(base64.b64encode(COFFEE).decode(), is_base64=True)
    hashes = [i.content_hash for i in _render(renderer, MediaBytes(COFFEE), b64).mm_items]
    assert hashes[0] == hashes[1]  # the same file, sent raw or as a data: URL
    again = _render(_renderer(default_model_dir, "uint8"), b64, MediaBytes(ROCKET)).mm_items
    assert again[0].content_hash == hashes[0] and again[1].content_hash != hashes[0]
    # Other pixels from the same bytes: the form on the wire, or a processor setting.
    as_bf16 = _render(_renderer(default_model_dir, "bfloat16"), b64, b64).mm_items
    assert as_bf16[0].content_hash != hashes[0]
    other = tmp_path / "model"
    shutil.copytree(default_model_dir, other)
    path = other / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"]["size"]["longest_edge"] //= 2
    path.write_text(json.dumps(config))
    smaller = _render(_renderer(other, "uint8"), b64, b64).mm_items
    assert smaller[0].content_hash != hashes[0]


def test_one_frame_patches_are_half_of_the_processors_rows(default_model_dir: Path) -> None:
    """A still image's patch rows hold two copies of its frame: with ``uint8_one_frame`` one
    travels (the engine repeats it), and the encoder-cache key stays the same, since the
    tower's input does."""
    media = MediaBytes(COFFEE), MediaBytes(ROCKET)
    whole = _render(_renderer(default_model_dir, "uint8"), *media).mm_items
    one = _render(_renderer(default_model_dir, "uint8", one_frame=True), *media).mm_items
    for full, half in zip(whole, one, strict=True):
        assert full.pixel_values is not None and half.pixel_values is not None
        rows = full.pixel_values.shape[0]
        assert half.pixel_values.shape == (rows, 588) and half.grid_thw == full.grid_thw
        frames = full.pixel_values.view(rows, 3, 2, 196)
        assert torch.equal(frames[:, :, 0], frames[:, :, 1])
        assert torch.equal(half.pixel_values.view(rows, 3, 196), frames[:, :, 0])
        assert half.content_hash == full.content_hash


def test_uint8_needs_the_torchvision_processor(default_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(default_model_dir)
    processor.image_processor = AutoImageProcessor.from_pretrained(default_model_dir, backend="pil")
    with pytest.raises(RuntimeError, match="torchvision image processor"):
        _renderer(default_model_dir, "uint8", processor)
    _renderer(default_model_dir, "float32", processor).close()  # float pixels: any processor


def test_float_pixels_where_uint8_was_asked_for_are_refused(default_model_dir: Path) -> None:
    renderer = _renderer(default_model_dir, "uint8")
    ids = np.array([renderer._ready.image_token_id] * 4, dtype=np.int64)
    try:
        with pytest.raises(ApiError, match="returned torch.float32 pixels, not uint8"):
            renderer._with_images(ids, torch.zeros(16, 1176), torch.tensor([[1, 4, 4]]), ["h"])
    finally:
        renderer.close()


def test_prompt_equals_the_processors_own(default_model_dir: Path) -> None:
    """The renderer tokenizes a chat with one placeholder per image and expands it; the
    processor expands the text and tokenizes that. Same ids, image runs and patches, for
    real photos of different sizes between real text (one of them with text that itself
    spells the image markers' neighbours)."""
    renderer = _renderer(default_model_dir, "uint8")
    processor = AutoProcessor.from_pretrained(default_model_dir)
    texts = [*sharegpt_prompts(3, max_chars=400), "<|vision_start|> a b<|vision_end|>x"]
    photos = [COFFEE, ROCKET, _jpeg(skimage.data.astronaut(), (200, 333))]
    try:
        for text, count in zip(texts, (1, 2, 3, 2), strict=True):
            content: list[dict[str, Any]] = [{"type": "text", "text": text}]
            content[count % 2 : count % 2] = [{"type": "image"}] * count
            chat = [{"role": "user", "content": content}]
            media = [MediaBytes(p) for p in photos[:count]]
            prompt = renderer.chat_blocking(chat, media, True, 16)
            images = [Image.open(io.BytesIO(p)).convert("RGB") for p in photos[:count]]
            expected = processor(
                text=[processor.apply_chat_template(chat, add_generation_prompt=True)],
                images=images,
                return_tensors="pt",
                do_rescale=False,
                do_normalize=False,
            )
            assert prompt.token_ids.tolist() == expected["input_ids"][0].tolist()
            image_id = renderer._ready.image_token_id
            for item in prompt.mm_items:
                run = prompt.token_ids[item.offset : item.offset + item.length]
                assert (run == image_id).all() and prompt.token_ids[item.offset - 1] != image_id
            pixels = torch.cat([item.pixel_values for item in prompt.mm_items])
            assert torch.equal(pixels, expected["pixel_values"])
            grids = [list(item.grid_thw) for item in prompt.mm_items]
            assert grids == expected["image_grid_thw"].tolist()
    finally:
        renderer.close()


def test_text_spelling_the_image_placeholder_is_refused(default_model_dir: Path) -> None:
    renderer = _renderer(default_model_dir, "uint8")
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<|image_pad|>"}]}
    ]
    try:
        with pytest.raises(ApiError, match="placeholder tokens without images") as err:
            renderer.chat_blocking(chat, [MediaBytes(COFFEE)], True, 16)
        assert err.value.status == 400
    finally:
        renderer.close()
