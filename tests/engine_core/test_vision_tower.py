"""Our vision tower equals HF's in float32 on the CPU: the default model's Qwen2-VL tower on real
photos, and a random Qwen2.5-VL tower whose windows do not divide the grids (edge windows),
with several full-attention blocks and a two-frame grid; several images in one call give each
image what it gets alone."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import skimage.data
import torch
from PIL import Image

from engine_core.model.errors import ModelLoadError
from engine_core.model.kernels import Kernels
from engine_core.model.loader import CheckpointTensor, iter_tensors
from engine_core.model.pixels import PixelInput
from engine_core.model.vision import VisionEncoder

CPU = torch.device("cpu")


def _encoder(model_type: str, config: Any, tensors: list[CheckpointTensor]) -> VisionEncoder:
    pixels = PixelInput(CPU, torch.float32, config.in_channels)  # normalized pixels come in
    encoder = VisionEncoder(model_type, config, torch.float32, CPU, Kernels.eager(), pixels)
    encoder.load_weights(tensors, "test")
    return encoder


def _split(pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[Any]:
    out, row = [], 0
    for grid in grids:
        n = grid[0] * grid[1] * grid[2]
        out.append((pixels[row : row + n], grid))
        row += n
    return out


def test_default_tower_matches_hf(hf_model: Any, processor: Any, default_model_dir: Path) -> None:
    photos = [
        Image.fromarray(skimage.data.astronaut()),
        Image.fromarray(skimage.data.coffee()).resize((300, 200)),
        Image.fromarray(skimage.data.chelsea()).resize((150, 330)),
    ]
    inputs = processor.image_processor(images=photos, return_tensors="pt")
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    assert len(set(grids)) == 3
    with torch.no_grad():
        expected = hf_model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tensors = [t for t in iter_tensors(str(default_model_dir)) if t.key.startswith("visual.")]
    encoder = _encoder(hf_model.config.model_type, hf_model.config.vision_config, tensors)
    images = _split(inputs["pixel_values"], grids)
    ours = encoder.encode(images)
    torch.testing.assert_close(torch.cat(ours), expected.pooler_output)
    for (pixels, grid), batched in zip(images, ours, strict=True):
        torch.testing.assert_close(encoder.encode([(pixels, grid)])[0], batched)


@pytest.fixture(scope="module")
def qwen2_5() -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    vision = {
        "depth": 4,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_heads": 4,
        "out_hidden_size": 48,
        "window_size": 56,  # 2 x 2 merged units per window
        "fullatt_block_indexes": [1, 3],
    }
    config = Qwen2_5_VLConfig(vision_config=vision).vision_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).eval()
        with torch.no_grad():  # norms and biases off their init values, so they count
            for name, p in tower.named_parameters():
                p.normal_(0.0, 0.2 if name.endswith("weight") else 0.1)
    return config, tower


def test_qwen2_5_windowed_tower_matches_hf(qwen2_5: tuple[Any, Any]) -> None:
    config, tower = qwen2_5
    grids = [(1, 10, 14), (1, 8, 8), (2, 6, 4), (1, 2, 2)]
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=gen)
    with torch.no_grad():
        expected = tower(pixels, grid_thw=torch.tensor(grids)).pooler_output
    tensors = [CheckpointTensor("hf", n, "visual." + n, t) for n, t in tower.state_dict().items()]
    encoder = _encoder("qwen2_5_vl", config, tensors)
    images = _split(pixels, grids)
    ours = encoder.encode(images)
    torch.testing.assert_close(torch.cat(ours), expected)
    for (p, grid), batched in zip(images, ours, strict=True):
        torch.testing.assert_close(encoder.encode([(p, grid)])[0], batched)


def test_missing_packed_shard_is_named(qwen2_5: tuple[Any, Any]) -> None:
    config, tower = qwen2_5
    tensors = [
        CheckpointTensor("hf", n, "visual." + n, t)
        for n, t in tower.state_dict().items()
        if n != "blocks.2.mlp.up_proj.bias"
    ]
    with pytest.raises(ModelLoadError, match=r"visual\.blocks\.2\.mlp\.up_proj\.bias"):
        _encoder("qwen2_5_vl", config, tensors)


def test_an_attention_kernel_is_used_only_if_it_runs_and_agrees_with_sdpa() -> None:
    from engine_core.model import vision_attention as va

    def per_segment(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float) -> Any:
        lens = torch.diff(cu).tolist()
        return va.attend_runs(q, k, v, va.Segments.of(lens), scale, None)

    def wrong(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float) -> Any:
        return torch.nn.functional.scaled_dot_product_attention(  # one segment: all of them
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
        ).transpose(0, 1)

    def broken(*args: Any) -> Any:
        raise RuntimeError("head dim not supported")

    def check(kernel: Any) -> str | None:
        return va._problem(va.TowerAttention(varlen=kernel), CPU, torch.float32, 4, 16)

    assert check(per_segment) is None
    assert "relative error" in (check(wrong) or "")
    assert "head dim not supported" in (check(broken) or "")
    # The batched form: every SDPA backend that runs on the CPU agrees with itself per run.
    batched = va.TowerAttention(batched=torch.nn.attention.SDPBackend.MATH)
    assert va._problem(batched, CPU, torch.float32, 4, 16) is None
    on_cpu = va.tower_attention(CPU, torch.float32, 4, 16)
    assert on_cpu.varlen is None and on_cpu.batched is None


def test_segments_know_their_runs_and_each_call_takes_the_path_it_fits() -> None:
    """Few runs of shapes seen in ``warm_after`` earlier calls: the batched backend; many
    runs, or a shape not seen often enough yet, or past ``max_shapes``: varlen. Same values
    either way."""
    from engine_core.model import vision_attention as va

    segments = va.Segments.of([64, 64, 5, 64, 64, 64])
    assert segments.runs == ((64, 2), (5, 1), (64, 3)) and segments.max_len == 64
    calls: list[str] = []

    def varlen(q: Any, k: Any, v: Any, cu: Any, max_len: int, scale: float) -> Any:
        calls.append("varlen")
        return va.attend_runs(q, k, v, va.Segments.of(torch.diff(cu).tolist()), scale, None)

    attention = va.TowerAttention(
        varlen=varlen, batched=torch.nn.attention.SDPBackend.MATH, warm_after=2, max_shapes=2
    )
    gen = torch.Generator().manual_seed(0)

    def path(lens: list[int]) -> str:
        """One tower call of 3 blocks over segments of ``lens``: the path its blocks took."""
        n = sum(lens)
        q, k, v = (torch.randn(n, 2, 8, generator=gen) for _ in range(3))
        calls.clear()
        segments = attention.prepare(lens)  # once per call: blocks do not count as calls
        for _ in range(3):
            got = attention(q, k, v, segments, 8**-0.5)
        assert calls in ([], ["varlen"] * 3)
        want = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    *(x[a:b].transpose(0, 1) for x in (q, k, v)), scale=8**-0.5
                ).transpose(0, 1)
                for a, b in itertools.pairwise([0, *itertools.accumulate(lens)])
            ]
        )
        torch.testing.assert_close(got, want)
        return calls[0] if calls else "batched"

    assert [path([64, 64, 5]) for _ in range(3)] == ["varlen", "varlen", "batched"]
    assert attention.built_shapes == 2  # (2 x 64) and (1 x 5)
    assert path([8, 5] * 3) == "varlen"  # six runs: one varlen call beats six batched ones
    assert [path([32]) for _ in range(3)] == ["varlen"] * 3  # no third shape is built
    assert attention.built_shapes == 2
