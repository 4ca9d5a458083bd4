"""Read HF safetensors checkpoints (one file or sharded) into our modules.

Checkpoint names come in two schemes: the classic one (``model.layers.*``,
``model.embed_tokens.*``, ``visual.*``) and transformers 5.x Qwen2-VL saves
(``model.language_model.layers.*``, ``model.visual.*``). ``canonical_name`` maps both to one
scheme: ``decoder.<name inside the text model>``, ``visual.<name>`` or ``lm_head.weight``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from engine_core.model.errors import ModelLoadError

_DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
_VISUAL_PREFIXES = ("model.visual.", "visual.")


def canonical_name(name: str) -> str | None:
    """Map a checkpoint tensor name to our scheme; None for tensors we never use."""
    if name == "lm_head.weight" or name == "language_model.lm_head.weight":
        return "lm_head.weight"
    for prefix in _VISUAL_PREFIXES:
        if name.startswith(prefix):
            return "visual." + name[len(prefix) :]
    for prefix in _DECODER_PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            # old Llama checkpoints carry the rotary table; we compute it ourselves
            return None if rest.endswith("rotary_emb.inv_freq") else "decoder." + rest
    return None


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: the shards its index names, or the single file."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"corrupt checkpoint index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.exists(single):
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    return [single]


@dataclass(frozen=True, slots=True)
class CheckpointTensor:
    """One tensor of a checkpoint: where it came from and its name in our scheme."""

    file: str
    name: str  # as stored in the file (for error messages)
    key: str  # canonical_name(name)
    tensor: torch.Tensor


def iter_tensors(model_dir: str) -> Iterator[CheckpointTensor]:
    """Every tensor we use, on the CPU."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    key = canonical_name(name)
                    if key is not None:
                        yield CheckpointTensor(path, name, key, f.get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read checkpoint file {path}: {e}") from e


def copy_into(param: torch.Tensor, item: CheckpointTensor, rows: slice | None = None) -> None:
    """Copy ``item.tensor`` into ``param`` (or into ``param[rows]``), checking the shape."""
    target = param.data if rows is None else param.data[rows]
    if target.shape != item.tensor.shape:
        raise ModelLoadError(
            f"tensor {item.name} in {item.file} has shape {tuple(item.tensor.shape)}, "
            f"the model expects {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(item.tensor)
