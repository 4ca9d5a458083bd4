"""The default model: HF loads it offline and generates, its chat template renders the Qwen
layout, builds are byte-identical, the cache repairs itself, and check_model_dir names bad files."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from apiserver.launch.default_model import (
    ModelDirError,
    check_model_dir,
    ensure_default_model,
)
from apiserver.launch.default_model import default_model_dir as cached_model_dir
from apiserver.launch.default_model.manifest import MANIFEST_NAME, manifest_problem

IMAGE_PART = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor(default_model_dir: Path) -> Any:
    return AutoProcessor.from_pretrained(default_model_dir)


@pytest.fixture(scope="module")
def model(default_model_dir: Path) -> torch.nn.Module:
    return AutoModelForImageTextToText.from_pretrained(default_model_dir).eval()


def _render(processor: Any, messages: list[dict], add_generation_prompt: bool = True) -> str:
    return processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


# ---------------------------------------------------------------- loading and generation


def test_config_matches_the_tokenizer(default_model_dir: Path) -> None:
    config = json.loads((default_model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    text = config["text_config"]
    assert text["vocab_size"] == len(tokenizer)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert config["vision_config"]["hidden_size"] == text["hidden_size"]
    for key, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert config[key] == tokenizer.convert_tokens_to_ids(token)
    generation = json.loads((default_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids(
        ["<|im_end|>", "<|endoftext|>"]
    )
    # Special tokens must stay whole: one id each, never split by BPE.
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_generates_from_a_text_chat_prompt(default_model_dir: Path, model: torch.nn.Module) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    new = out[0, prompt_len:].tolist()
    assert 0 < len(new) <= 16
    assert all(0 <= t < len(tokenizer) for t in new)
    # Random weights, but scaled so greedy decoding does not collapse onto one token.
    assert len(set(new)) > 1
    again = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(out, again)


def test_generates_from_an_image_prompt(processor: Any, model: torch.nn.Module) -> None:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}
    ]
    image = Image.fromarray(skimage.data.astronaut())
    inputs = processor(text=[_render(processor, messages)], images=[image], return_tensors="pt")
    image_token_id = model.config.image_token_id
    num_image_tokens = int(inputs["image_grid_thw"].prod()) // 4  # merge_size 2 x 2
    assert int((inputs["input_ids"] == image_token_id).sum()) == num_image_tokens
    assert int((inputs["mm_token_type_ids"] == 1).sum()) == num_image_tokens
    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert 0 < out.shape[1] - prompt_len <= 8
    # The pixels reach the text model: another photo, same prompt, another continuation.
    other = processor(
        text=[_render(processor, messages)],
        images=[Image.fromarray(skimage.data.coffee())],
        return_tensors="pt",
    )
    other_out = model.generate(**other, max_new_tokens=8, do_sample=False)
    assert other_out[0, other["input_ids"].shape[1] :].tolist() != out[0, prompt_len:].tolist()


# ---------------------------------------------------------------- chat template


def test_template_renders_multi_turn_with_system(processor: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\nHow can I help?"},
        {"role": "user", "content": "Bye"},
    ]
    assert _render(processor, messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!\nHow can I help?<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert _render(processor, messages, add_generation_prompt=False).endswith(
        "<|im_start|>user\nBye<|im_end|>\n"
    )


def test_template_renders_text_and_image_parts(processor: Any) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    assert _render(processor, messages) == (
        f"<|im_start|>user\nCompare {IMAGE_PART} with {IMAGE_PART}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tokenizer_carries_the_same_template(default_model_dir: Path, processor: Any) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    assert tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == _render(processor, messages)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "wizard", "content": "hi"}], "unsupported message role: wizard"),
        (
            [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}],
            "unsupported content part type: audio",
        ),
    ],
)
def test_template_rejects_unknown_roles_and_parts(
    default_model_dir: Path, messages: list[dict], error: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    with pytest.raises(Exception, match=error):
        tokenizer.apply_chat_template(messages, tokenize=False)


# ---------------------------------------------------------------- determinism and the cache


def _same_files(a: Path, b: Path) -> None:
    names = json.loads((a / MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(names)
    for name in [*names, MANIFEST_NAME]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ensure_builds_on_first_use_byte_identical_to_another_build(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FANIN_CACHE_DIR", str(tmp_path / "cache"))
    cached = ensure_default_model()
    assert cached.parent == tmp_path / "cache" / "models"
    assert manifest_problem(cached) is None
    check_model_dir(cached)
    _same_files(cached, default_model_dir)
    assert [p.name for p in cached.parent.iterdir() if p.name.startswith(".")] == []


def _delete_tokenizer(model: Path) -> None:
    (model / "tokenizer.json").unlink()


def _flip_a_weight_byte(model: Path) -> None:
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside tensor data: the header stays valid, only the hash can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_delete_tokenizer, _flip_a_weight_byte])
def test_ensure_rebuilds_a_damaged_cache(
    damage: Callable[[Path], None],
    default_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FANIN_CACHE_DIR", str(tmp_path))
    cached = cached_model_dir()
    shutil.copytree(default_model_dir, cached)
    damage(cached)
    assert manifest_problem(cached) is not None
    assert ensure_default_model() == cached
    assert manifest_problem(cached) is None
    _same_files(cached, default_model_dir)


def _flock_waiters(path: Path) -> int:
    """How many flock() calls are blocked on ``path`` right now (Linux's /proc/locks)."""
    inode = str(path.stat().st_ino)
    return sum(
        1
        for line in Path("/proc/locks").read_text().splitlines()
        if "->" in line and "FLOCK" in line and line.split()[6].rsplit(":", 1)[1] == inode
    )


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_ensure_waits_for_a_build_in_progress(
    default_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While another caller holds the lock (as a building process would), ensure waits, then
    finds the finished model instead of building a second one."""
    monkeypatch.setenv("FANIN_CACHE_DIR", str(tmp_path))
    cached = cached_model_dir()
    cached.parent.mkdir(parents=True)
    lock_path = cached.with_name(cached.name + ".lock")
    results: list[Path | BaseException] = []

    def ensure() -> None:
        try:
            results.append(ensure_default_model())
        except BaseException as e:  # surfaced by the assert below
            results.append(e)

    caplog.set_level(logging.INFO, logger="apiserver.launch.default_model.cache")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiter = threading.Thread(target=ensure)
        waiter.start()
        while _flock_waiters(lock_path) == 0:
            assert waiter.is_alive(), results
            time.sleep(0.01)
        shutil.copytree(default_model_dir, cached)  # the "other process" finishes its build
        weights_inode = (cached / "model.safetensors").stat().st_ino
    waiter.join(timeout=60)
    assert results == [cached]
    assert (cached / "model.safetensors").stat().st_ino == weights_inode
    assert "building the default model" not in caplog.text


def test_ensure_reuses_an_intact_cache(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FANIN_CACHE_DIR", str(tmp_path))
    cached = cached_model_dir()
    shutil.copytree(default_model_dir, cached)
    weights_inode = (cached / "model.safetensors").stat().st_ino
    assert ensure_default_model() == cached
    assert (cached / "model.safetensors").stat().st_ino == weights_inode


def test_cache_location_follows_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FANIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cached_model_dir().parent == tmp_path / "xdg" / "fanin" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cached_model_dir().parent == tmp_path / "home" / ".cache" / "fanin" / "models"


def test_build_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    from apiserver.launch.default_model import build_model

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_model(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- check_model_dir


@pytest.fixture
def model_copy(default_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(default_model_dir, tmp_path / "model"))


def test_check_accepts_the_default_model(default_model_dir: Path) -> None:
    check_model_dir(default_model_dir)


def test_check_rejects_a_missing_path_and_a_file(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="nowhere: model folder does not exist"):
        check_model_dir(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirError, match="file: not a folder"):
        check_model_dir(tmp_path / "file")


def test_check_names_a_missing_config(model_copy: Path) -> None:
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelDirError, match=r"config\.json: missing"):
        check_model_dir(model_copy)


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("config.json", '{"model_type": "qwen2_vl",', r"config\.json: not valid JSON \(Expecting"),
        ("config.json", "[1, 2]", r"config\.json: not a JSON object"),
        ("tokenizer.json", "{", r"tokenizer\.json: not valid JSON"),
        ("generation_config.json", "nope", r"generation_config\.json: not valid JSON"),
    ],
)
def test_check_names_an_unparsable_json_file(
    model_copy: Path, name: str, text: str, error: str
) -> None:
    (model_copy / name).write_text(text)
    with pytest.raises(ModelDirError, match=error):
        check_model_dir(model_copy)


def test_check_requires_tokenizer_files(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="no tokenizer files"):
        check_model_dir(model_copy)


def test_check_requires_safetensors_weights(model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=r"no \*\.safetensors weight files$"):
        check_model_dir(model_copy)
    (model_copy / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelDirError, match="only safetensors are supported"):
        check_model_dir(model_copy)


def _rewrite_weights(model: Path, edit: Callable[[bytes], bytes]) -> None:
    path = model / "model.safetensors"
    path.write_bytes(edit(path.read_bytes()))


def _corrupt_header_json(data: bytes) -> bytes:
    return data[:8] + b"!" + data[9:]


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda data: data[:-1000], "truncated"),
        (lambda data: data + b"\0" * 8, "truncated or padded"),
        (lambda data: data[:5], r"truncated safetensors file \(5 bytes\)"),
        (lambda data: struct.pack("<Q", 1 << 40) + data[8:], "claims 1099511627776 header bytes"),
        (_corrupt_header_json, "corrupt safetensors header"),
    ],
)
def test_check_names_corrupt_safetensors(
    model_copy: Path, edit: Callable[[bytes], bytes], error: str
) -> None:
    _rewrite_weights(model_copy, edit)
    with pytest.raises(ModelDirError, match=rf"model\.safetensors: .*{error}"):
        check_model_dir(model_copy)


def _shard(model: Path) -> dict[str, str]:
    """Split the weights into two shards with an index, as big HF checkpoints are laid out."""
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate([names[::2], names[1::2]]):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, model / shard)
        weight_map.update(dict.fromkeys(part, shard))
    _write_index(model, weight_map)
    return weight_map


def _write_index(model: Path, weight_map: dict[str, str]) -> None:
    index = {"metadata": {}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def test_check_accepts_a_sharded_checkpoint(model_copy: Path) -> None:
    _shard(model_copy)
    check_model_dir(model_copy)


def test_check_names_a_missing_shard(model_copy: Path) -> None:
    _shard(model_copy)
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelDirError, match=r"model-00002-of-00002\.safetensors: missing \(listed in"
    ):
        check_model_dir(model_copy)


def test_check_names_a_shard_lacking_indexed_tensors(model_copy: Path) -> None:
    weight_map = _shard(model_copy)
    weight_map["model.extra.weight"] = "model-00001-of-00002.safetensors"
    _write_index(model_copy, weight_map)
    with pytest.raises(ModelDirError, match=r"00001-of-00002\.safetensors: lacks .*extra"):
        check_model_dir(model_copy)


def test_check_refuses_shard_paths_outside_the_folder(model_copy: Path) -> None:
    weight_map = _shard(model_copy)
    weight_map["model.extra.weight"] = "../elsewhere.safetensors"
    _write_index(model_copy, weight_map)
    with pytest.raises(ModelDirError, match=r"index\.json: bad shard name '\.\./elsewhere"):
        check_model_dir(model_copy)
