"""uint8 pixels normalized by the engine give the very values of the image processor's own
float output, on real photos (scikit-image's samples, at their own sizes, 1024x768 and
1920x1080) and for every rescale/normalize setting a processor config can hold, whether the
patches hold the temporal patch's two copies of a still image's frame or the one frame; through
the real vision tower all give the same embeddings; the engine accepts uint8 only when it
normalizes itself, and picks the transfer from the model's processor."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import skimage.data
import torch
from conftest import admit, image_request
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor

from engine_core.model.errors import ModelLoadError
from engine_core.model.pixels import PixelInput

CPU = torch.device("cpu")
UINT8 = {"do_rescale": False, "do_normalize": False}
#: One frame per patch row: what API servers send when READY says ``uint8_one_frame``.
ONE_FRAME = {**UINT8, "temporal_patch_size": 1}


def _photos() -> list[Image.Image]:
    astronaut = Image.fromarray(skimage.data.astronaut())
    return [
        astronaut,
        Image.fromarray(skimage.data.coffee()),
        Image.fromarray(skimage.data.chelsea()),
        Image.fromarray(skimage.data.rocket()),
        Image.fromarray(skimage.data.hubble_deep_field()).resize((1024, 768)),
        astronaut.resize((1920, 1080)),
    ]


PHOTOS = _photos()


def _model_with(base: Path, tmp: Path, **image_processor: Any) -> Path:
    """A copy of the default model whose image processor has ``image_processor`` settings."""
    target = tmp / "model"
    shutil.copytree(base, target)
    path = target / "processor_config.json"
    config = json.loads(path.read_text())
    config["image_processor"].update(image_processor)
    path.write_text(json.dumps(config))
    return target


def _pixel_input(model: Path, dtype: torch.dtype = torch.float32, transfer: str = "auto") -> Any:
    vision = AutoConfig.from_pretrained(model).vision_config
    return PixelInput.for_model(str(model), vision, CPU, dtype, transfer)  # type: ignore[arg-type]


@pytest.mark.parametrize("frames", [2, 1])
@pytest.mark.parametrize("photo", range(len(PHOTOS)))
def test_engine_normalization_equals_the_processor_on_real_photos(
    default_model_dir: Path, processor: Any, photo: int, frames: int
) -> None:
    image = PHOTOS[photo]
    floats = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    kwargs = UINT8 if frames == 2 else ONE_FRAME
    raw = processor.image_processor(images=[image], return_tensors="pt", **kwargs)
    pixels = raw["pixel_values"]
    assert pixels.dtype == torch.uint8 and pixels.shape[0] == floats.shape[0]
    assert pixels.shape[1] * 2 // frames == floats.shape[1]
    assert torch.equal(_pixel_input(default_model_dir).to_tower(pixels), floats)
    bf16 = _pixel_input(default_model_dir, torch.bfloat16).to_tower(pixels)
    assert torch.equal(bf16, floats.to(torch.bfloat16))


@pytest.mark.parametrize(
    "settings",
    [
        {"do_normalize": False},
        {"do_rescale": False},
        {"do_rescale": False, "do_normalize": False},
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        {"rescale_factor": 0.0078125, "image_mean": 0.25, "image_std": 0.75},
    ],
)
def test_every_rescale_and_normalize_setting(
    default_model_dir: Path, tmp_path: Path, settings: dict[str, Any]
) -> None:
    model = _model_with(default_model_dir, tmp_path, **settings)
    image_processor = AutoImageProcessor.from_pretrained(model)
    image = PHOTOS[1]
    floats = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    for kwargs in (UINT8, ONE_FRAME):
        pixels = image_processor(images=[image], return_tensors="pt", **kwargs)["pixel_values"]
        assert torch.equal(_pixel_input(model).to_tower(pixels), floats.to(torch.float32))


def test_the_chat_processor_passes_uint8_through(processor: Any) -> None:
    """The API server calls the whole processor (template text and images) this way."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    out = processor(text=[text], images=[PHOTOS[0]], return_tensors="pt", **UINT8)
    alone = processor.image_processor(images=[PHOTOS[0]], return_tensors="pt", **UINT8)
    assert out["pixel_values"].dtype == torch.uint8
    assert out["pixel_values"].is_contiguous()
    assert torch.equal(out["pixel_values"], alone["pixel_values"])


def test_transfer_follows_the_flag_and_the_processor(default_model_dir: Path) -> None:
    uint8 = _pixel_input(default_model_dir)
    assert uint8.wire_dtype == "uint8"
    # 3 channels x 14 x 14: one frame of the tower's 2-frame temporal patch.
    assert (uint8.temporal, uint8.frame_dim) == (2, 588)
    normalized = _pixel_input(default_model_dir, torch.bfloat16, "normalized")
    assert normalized.wire_dtype == "bfloat16" and not normalized.accepts_uint8
    assert normalized.frame_dim == 0
    # transformers' PIL backend (chosen where torchvision is missing) resizes with PIL and
    # normalizes in numpy: its float values are not what the engine computes.
    pil = AutoImageProcessor.from_pretrained(default_model_dir, backend="pil")
    assert PixelInput.for_processor(pil, 3, CPU, torch.float32, "auto").wire_dtype == "float32"
    with pytest.raises(ModelLoadError, match="needs transformers' torchvision image processor"):
        PixelInput.for_processor(pil, 3, CPU, torch.float32, "uint8")


def test_a_checkpoint_without_image_processor_gets_normalized_pixels(
    default_model_dir: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(default_model_dir, bare)
    (bare / "processor_config.json").unlink()
    assert _pixel_input(bare).wire_dtype == "float32"
    with pytest.raises(ModelLoadError, match="--pixel-transfer uint8: no image processor"):
        _pixel_input(bare, transfer="uint8")


def test_the_vision_tower_sees_the_same_input(
    make_runner: Callable[..., Any], processor: Any
) -> None:
    runner = make_runner()
    assert runner.facts.pixel_dtype == "uint8"
    grid = None
    encoded = []
    for kwargs in ({}, UINT8, ONE_FRAME):
        out = processor.image_processor(images=[PHOTOS[2]], return_tensors="pt", **kwargs)
        grid = tuple(out["image_grid_thw"][0].tolist())
        encoded.extend(runner.vision.encode([(out["pixel_values"], grid)]))
    assert torch.equal(encoded[0], encoded[1]) and torch.equal(encoded[0], encoded[2])


def _small_photo(
    encode: Callable[..., Any], processor: Any, kwargs: dict[str, Any]
) -> tuple[Any, torch.Tensor]:
    """An image request for a small real photo, and that photo's patches from the processor
    run with ``kwargs``."""
    image = PHOTOS[1].resize((224, 168))
    request = image_request("u", encode("What is this?", [image]), processor.image_token_id)
    raw = processor.image_processor(images=[image], return_tensors="pt", **kwargs)
    return request, raw["pixel_values"]


def _admitted(runner: Any, request: Any, pixels: torch.Tensor) -> str | None:
    """The engine's verdict on ``request`` with ``pixels`` in place of its image's."""
    item = msgspec.structs.replace(request.mm_items[0], pixel_values=pixels)
    return admit(runner, msgspec.structs.replace(request, mm_items=[item]))


def test_uint8_is_accepted_only_where_the_engine_normalizes(
    make_runner: Callable[..., Any], encode: Callable[..., Any], processor: Any
) -> None:
    request, pixels = _small_photo(encode, processor, UINT8)
    assert _admitted(make_runner(), request, pixels) is None
    error = _admitted(make_runner(pixel_transfer="normalized"), request, pixels)
    assert error == "pixel_values must be a floating-point tensor, not torch.uint8"
    error = _admitted(make_runner(), request, pixels.to(torch.int16))
    assert error == "pixel_values must be a uint8 or floating-point tensor, not torch.int16"


def test_one_frame_rows_are_taken_as_uint8_only(
    make_runner: Callable[..., Any], encode: Callable[..., Any], processor: Any
) -> None:
    request, pixels = _small_photo(encode, processor, ONE_FRAME)
    rows, grid = pixels.shape[0], request.mm_items[0].grid_thw
    assert _admitted(make_runner(), request, pixels) is None
    # One frame in float (normalized pixels always hold the whole temporal patch)...
    error = _admitted(make_runner(), request, pixels.to(torch.float32))
    assert error == f"pixel_values of shape ({rows}, 588) disagree with grid {grid}: " + (
        f"expected ({rows}, 1176)"
    )
    # ...or a row of neither length.
    error = _admitted(make_runner(), request, pixels[:, :500].contiguous())
    assert error is not None and f"expected ({rows}, 1176) or ({rows}, 588)" in error
    # The engine that normalizes nothing takes no uint8 at all.
    error = _admitted(make_runner(pixel_transfer="normalized"), request, pixels)
    assert error == "pixel_values must be a floating-point tensor, not torch.uint8"
