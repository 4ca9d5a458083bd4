"""What the runner needs to know about a checkpoint, read once from its config.json.

transformers 5.x keeps a Qwen2-VL's text parameters in ``config.text_config``; older and
text-only configs keep them at the top level. ``read_spec`` hides that difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from engine_core.model.errors import ModelLoadError

DECODER_ARCHS = (
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
)
VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")


@dataclass(frozen=True, slots=True)
class DecoderSpec:
    """Shapes and options of a Qwen2 / Llama / Qwen2-VL text decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    mrope_section: tuple[int, ...] | None
    image_token_id: int | None
    eos_token_ids: tuple[int, ...]
    #: the config whose rope parameters HF's rope init functions read (text config for VL)
    text_config: PretrainedConfig
    #: the vision tower's config (None for text-only models)
    vision_config: PretrainedConfig | None


@dataclass(frozen=True, slots=True)
class ModelSpec:
    kind: Literal["decoder", "encoder"]
    config: PretrainedConfig
    decoder: DecoderSpec | None


def _eos_ids(*configs: Any) -> tuple[int, ...]:
    for cfg in configs:
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return ()


def _generation_eos(model_dir: str) -> tuple[int, ...]:
    """EOS ids of generation_config.json (chat models often list more than config.json)."""
    try:
        return _eos_ids(GenerationConfig.from_pretrained(model_dir, local_files_only=True))
    except (OSError, ValueError):
        return ()


def _decoder_spec(config: PretrainedConfig, model_dir: str) -> DecoderSpec:
    is_vl = config.model_type in VL_MODEL_TYPES
    text = getattr(config, "text_config", None) if is_vl else None
    text = text if text is not None else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    mrope = rope.get("mrope_section") if is_vl else None
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    tie = bool(
        getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    )
    return DecoderSpec(
        model_type=config.model_type,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=text.rms_norm_eps,
        # Qwen2 always has q/k/v bias; Llama-style configs say so with attention_bias.
        qkv_bias=config.model_type.startswith("qwen2")
        or bool(getattr(text, "attention_bias", False)),
        tie_word_embeddings=tie,
        max_position_embeddings=text.max_position_embeddings,
        mrope_section=tuple(mrope) if mrope else None,
        image_token_id=getattr(config, "image_token_id", None) if is_vl else None,
        eos_token_ids=tuple(dict.fromkeys(_eos_ids(config, text) + _generation_eos(model_dir))),
        text_config=text,
        vision_config=getattr(config, "vision_config", None) if is_vl else None,
    )


def read_spec(model_dir: str) -> ModelSpec:
    """Read ``model_dir/config.json`` (offline) and classify the model."""
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {e}") from e
    archs = tuple(getattr(config, "architectures", None) or ())
    if config.model_type in ENCODER_MODEL_TYPES:
        return ModelSpec("encoder", config, None)
    if config.model_type in ("qwen2", "llama", *VL_MODEL_TYPES) or set(archs) & set(DECODER_ARCHS):
        return ModelSpec("decoder", config, _decoder_spec(config, model_dir))
    raise ModelLoadError(
        f"unsupported model type {config.model_type!r} (architectures {list(archs)}) in {model_dir}"
    )
