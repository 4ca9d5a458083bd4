"""Cheap validation of any model folder a user passes (the default model or a real checkpoint).

Reads only JSON files and safetensors headers, never tensor data, so a multi-GB checkpoint is
checked in milliseconds and a bad folder is reported by name before any process loads it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

INDEX_NAME = "model.safetensors.index.json"
# JSON files HF reads at load time besides config.json; each one that exists must parse.
_JSON_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    INDEX_NAME,
)
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


class ModelDirError(ValueError):
    """A model folder is unusable; the message names the offending file and why."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ModelDirError(f"{path}: not valid UTF-8 JSON ({e})") from e
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read ({e.strerror})") from e


def _check_tokenizer(model_dir: Path) -> None:
    has_tokenizer = (
        (model_dir / "tokenizer.json").is_file()
        or (model_dir / "tokenizer.model").is_file()
        or ((model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file())
    )
    if not has_tokenizer:
        raise ModelDirError(
            f"{model_dir}: no tokenizer files "
            "(expected tokenizer.json, tokenizer.model, or vocab.json + merges.txt)"
        )


def safetensors_tensor_names(path: Path) -> set[str]:
    """Validate one safetensors file from its header alone; return its tensor names."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelDirError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise ModelDirError(
                    f"{path}: corrupt safetensors header (claims {header_len} header bytes "
                    f"in a {size}-byte file)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read ({e.strerror})") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelDirError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ModelDirError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    if not header:
        raise ModelDirError(f"{path}: safetensors file holds no tensors")
    data_len = size - 8 - header_len
    for name, info in header.items():
        _check_tensor_entry(path, name, info, data_len)
    end = max(info["data_offsets"][1] for info in header.values())
    if end != data_len:
        raise ModelDirError(
            f"{path}: truncated or padded safetensors file "
            f"(header describes {end} data bytes, file holds {data_len})"
        )
    return set(header)


def _check_tensor_entry(path: Path, name: str, info: Any, data_len: int) -> None:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        valid = (
            isinstance(dtype, str)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise ModelDirError(f"{path}: corrupt safetensors header entry for tensor {name!r}")
    if end > data_len:
        raise ModelDirError(
            f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of the "
            f"data, file holds {data_len})"
        )
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise ModelDirError(
            f"{path}: corrupt safetensors header (tensor {name!r} {dtype}{shape} "
            f"does not fit its {end - begin} bytes)"
        )


def _check_indexed_weights(model_dir: Path) -> None:
    index_path = model_dir / INDEX_NAME
    weight_map = _read_json(index_path).get("weight_map") if index_path.is_file() else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirError(f"{index_path}: no 'weight_map' object of tensor -> shard file")
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise ModelDirError(f"{index_path}: bad shard name {shard!r} for tensor {tensor!r}")
        shards.setdefault(shard, set()).add(tensor)
    for shard, expected in sorted(shards.items()):
        shard_path = model_dir / shard
        if not shard_path.is_file():
            raise ModelDirError(f"{shard_path}: missing (listed in {INDEX_NAME})")
        missing = expected - safetensors_tensor_names(shard_path)
        if missing:
            raise ModelDirError(
                f"{shard_path}: lacks tensors listed in {INDEX_NAME}: {sorted(missing)[:5]}"
            )


def _check_weights(model_dir: Path) -> None:
    if (model_dir / INDEX_NAME).is_file():
        _check_indexed_weights(model_dir)
        return
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (only safetensors are supported)" if any(model_dir.glob("*.bin")) else ""
        raise ModelDirError(f"{model_dir}: no *.safetensors weight files{hint}")
    for path in files:
        safetensors_tensor_names(path)


def check_model_dir(path: str | os.PathLike[str]) -> None:
    """Validate a model folder cheaply; raise ModelDirError naming the first bad file.

    Checks: the folder exists; config.json exists and is a JSON object; every HF JSON file
    present parses; tokenizer files exist; safetensors weights exist with sound headers whose
    sizes match the files; an index's shards all exist and hold the tensors it lists.
    """
    model_dir = Path(path)
    if not model_dir.exists():
        raise ModelDirError(f"{model_dir}: model folder does not exist")
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: not a folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{config_path}: missing (every model folder needs one)")
    if not isinstance(_read_json(config_path), dict):
        raise ModelDirError(f"{config_path}: not a JSON object")
    for name in _JSON_FILES:
        if (model_dir / name).is_file():
            _read_json(model_dir / name)
    _check_tokenizer(model_dir)
    _check_weights(model_dir)
