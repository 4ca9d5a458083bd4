"""Checkpoint loading: both naming schemes, sharded files, tied embeddings, text-only Qwen2 and
Llama checkpoints, and a clear ModelLoadError for every broken checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import admit
from safetensors.torch import load_file, save_file

from engine_core.batch import Chunk
from engine_core.model.errors import ModelLoadError
from ipc.messages import EngineRequest, MultiModalItem, SamplingParams

PROMPT = np.array([5, 17, 300, 42, 7, 7, 1000, 64, 2, 99, 123, 256], dtype=np.int32)


def _request(ids: np.ndarray = PROMPT) -> EngineRequest:
    return EngineRequest(
        request_id="x", prompt_token_ids=ids, sampling=SamplingParams(temperature=0.0)
    )


def prompt_logits(runner: Any, ids: np.ndarray = PROMPT) -> torch.Tensor:
    """Logits of the last prompt token, in one chunk."""
    request = _request(ids)
    assert admit(runner, request) is None
    logits = runner.execute([Chunk(request, 0, 0, ids, True)]).logits[0]
    runner.release("x")
    return logits


def _copy_model(src: Path, dst: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """A copy of model folder ``src`` whose weights are ``tensors`` (in ``shards`` files)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"))
        return dst
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(names), shards)):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(dst / fname))
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def weights(default_model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(default_model_dir / "model.safetensors"))


def test_both_naming_schemes_and_shards_load_the_same(
    make_runner: Callable[..., Any],
    default_model_dir: Path,
    weights: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    """save_pretrained writes the classic scheme; the 5.x in-memory scheme (what other tools
    save) must load to the very same model, from three shards."""
    assert (
        "model.layers.0.self_attn.q_proj.weight" in weights
        and "visual.merger.ln_q.weight" in weights
    )
    new = {}
    for name, tensor in weights.items():
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = "model.language_model." + name.removeprefix("model.")
        new[name] = tensor
    sharded = _copy_model(default_model_dir, tmp_path / "new", new, shards=3)
    reference = prompt_logits(make_runner())
    assert torch.equal(prompt_logits(make_runner(sharded)), reference)


def test_tied_embeddings_use_the_embedding_matrix(
    make_runner: Callable[..., Any],
    default_model_dir: Path,
    weights: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    from transformers import AutoModelForImageTextToText

    tied = {n: t for n, t in weights.items() if n != "lm_head.weight"}
    path = _copy_model(default_model_dir, tmp_path / "tied", tied)
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    hf = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(PROMPT[None].astype(np.int64))).logits[0, -1]
    ours = prompt_logits(make_runner(path))
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, prompt_logits(make_runner()))  # the untied head differs


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_text_only_checkpoints_match_hf_greedy(
    make_runner: Callable[..., Any], tmp_path: Path, arch: str
) -> None:
    """Qwen2ForCausalLM (qkv bias, tied head) and LlamaForCausalLM (no bias, llama3 rope
    scaling, separate head): 12 greedy tokens equal HF generate's."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "eos_token_id": None,
    }
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    else:
        rope = {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=rope))
    model.save_pretrained(tmp_path / arch)
    with torch.no_grad():
        hf_out = model.eval().generate(
            torch.from_numpy(PROMPT[None].astype(np.int64)), do_sample=False, max_new_tokens=12
        )[0, PROMPT.size :]
    runner = make_runner(tmp_path / arch, max_model_len=256)
    assert not runner.facts.supports_images
    request = _request()
    assert admit(runner, request) is None
    ids, tokens = PROMPT, []
    for _ in range(12):
        start = PROMPT.size + len(tokens) - ids.size
        logits = runner.execute([Chunk(request, 0, start, ids, True)]).logits
        tokens.append(int(logits.argmax(-1)))
        ids = np.array(tokens[-1:], dtype=np.int32)
    assert tokens == hf_out.tolist()


def _broken(
    default_model_dir: Path,
    tmp_path: Path,
    weights: dict[str, torch.Tensor],
    change: Callable[[dict[str, torch.Tensor]], None],
) -> Path:
    tensors = dict(weights)
    change(tensors)
    return _copy_model(default_model_dir, tmp_path / "broken", tensors)


def test_missing_tensor_is_named(
    make_runner: Callable[..., Any],
    default_model_dir: Path,
    weights: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    name = "model.layers.1.self_attn.k_proj.weight"
    path = _broken(default_model_dir, tmp_path, weights, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.self_attn\.k_proj\.weight"):
        make_runner(path)


def test_missing_vision_tensor_is_named(
    make_runner: Callable[..., Any],
    default_model_dir: Path,
    weights: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    name = "visual.merger.ln_q.weight"
    path = _broken(default_model_dir, tmp_path, weights, lambda t: t.pop(name))
    with pytest.raises(ModelLoadError, match=r"merger\.ln_q\.weight"):
        make_runner(path)


def test_shape_mismatch_names_tensor_and_file(
    make_runner: Callable[..., Any],
    default_model_dir: Path,
    weights: dict[str, torch.Tensor],
    tmp_path: Path,
) -> None:
    name = "model.layers.0.mlp.up_proj.weight"

    def shrink(t: dict[str, torch.Tensor]) -> None:
        t[name] = t[name][:-1].clone()

    path = _broken(default_model_dir, tmp_path, weights, shrink)
    with pytest.raises(
        ModelLoadError,
        match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight in .*model\.safetensors has shape",
    ):
        make_runner(path)


def test_corrupt_file_is_named(
    make_runner: Callable[..., Any], default_model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "corrupt"
    shutil.copytree(default_model_dir, path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        make_runner(path)


def test_kv_budget_and_context_limits(make_runner: Callable[..., Any]) -> None:
    with pytest.raises(ModelLoadError, match="max-model-len"):
        make_runner(max_model_len=8192, cpu_kv_cache_bytes=1 << 20)
    with pytest.raises(ModelLoadError, match="max_position_embeddings"):
        make_runner(max_model_len=100_000)
    runner = make_runner(max_model_len=1024, cpu_kv_cache_bytes=4 << 20, max_num_seqs=64)
    # 2 layers * K,V * 2 kv heads * 32 dims * 4 bytes = 1 KiB per token: 4 slots of 1024 tokens
    assert runner.facts.num_slots == 4
    assert runner.facts.max_model_len == 1024


def test_qwen2_5_vl_checkpoint_matches_hf_greedy(
    make_runner: Callable[..., Any], tmp_path: Path
) -> None:
    """Qwen2.5-VL (windowed vision tower, 5.x naming): an image prompt decodes like HF."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    image_id, start_id, end_id = 500, 501, 502
    text = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "eos_token_id": None,
        "bos_token_id": 0,
        "pad_token_id": 0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "window_size": 56,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=image_id,
        vision_start_token_id=start_id,
        video_token_id=503,
        vision_end_token_id=end_id,
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path / "vl25")
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "vl25").eval()
    grid = (1, 8, 12)
    pixels = torch.randn(96, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    ids = [*(PROMPT % 400).tolist(), start_id, *[image_id] * 24, end_id, 7, 8, 9]
    with torch.no_grad():
        input_ids = torch.tensor([ids])
        expected = hf.generate(
            input_ids,
            pixel_values=pixels,
            image_grid_thw=torch.tensor([grid]),
            mm_token_type_ids=(input_ids == image_id).long(),
            do_sample=False,
            max_new_tokens=8,
        )[0, len(ids) :].tolist()
    item = MultiModalItem("h", "image", grid, PROMPT.size + 1, 24, pixels)
    request = EngineRequest(
        "v", np.array(ids, dtype=np.int32), [item], SamplingParams(temperature=0.0)
    )
    runner = make_runner(tmp_path / "vl25", max_model_len=256)
    assert runner.facts.supports_images and runner.facts.image_token_id == image_id
    assert admit(runner, request) is None
    chunk, tokens, start = np.array(ids, dtype=np.int32), [], 0
    for _ in range(8):
        logits = runner.execute([Chunk(request, 0, start, chunk, True)]).logits
        start += chunk.size
        tokens.append(int(logits.argmax(-1)))
        chunk = np.array(tokens[-1:], dtype=np.int32)
    assert tokens == expected
