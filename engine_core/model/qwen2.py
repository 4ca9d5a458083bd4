"""Our own Qwen2 / Qwen2.5 / Llama / Qwen2-VL text decoder (plain torch, flat token batches).

The forward pass takes the concatenated new tokens of all chunks of a step as one flat batch
``(T, hidden)``; attention (``attention.attend``) splits it back per chunk. Weights load from
checkpoint names in the ``decoder.*`` scheme of ``loader.canonical_name``; q/k/v and gate/up
are packed into one GEMM each.
"""

from __future__ import annotations

import torch
from torch import nn

from engine_core.model.attention import AttnMeta, attend
from engine_core.model.errors import ModelLoadError
from engine_core.model.kernels import Kernels
from engine_core.model.layers import RMSNorm, SwiGLU
from engine_core.model.loader import CheckpointTensor, copy_into
from engine_core.model.spec import DecoderSpec


class Attention(nn.Module):
    def __init__(self, spec: DecoderSpec, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        )
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self.qkv_proj = nn.Linear(
            spec.hidden_size, self.q_size + 2 * self.kv_size, bias=spec.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, spec.hidden_size, bias=False)
        self.scale = spec.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: torch.Tensor,
        meta: AttnMeta,
    ) -> torch.Tensor:
        """x (T, hidden); kv (2, num_slots, max_len, Hkv, D), this layer's cache."""
        t = x.shape[0]
        k_cache, v_cache = kv[0], kv[1]
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        q = self.kernels.rotary_store(
            self.qkv_proj(x),
            cos,
            sin,
            k_cache.view(flat_shape),
            v_cache.view(flat_shape),
            meta.write_index,
        )
        out = attend(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(t, self.q_size))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, kernels: Kernels) -> None:
        super().__init__()
        self.self_attn = Attention(spec, kernels)
        self.mlp = SwiGLU(spec.hidden_size, spec.intermediate_size, kernels)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, kernels)


class Decoder(nn.Module):
    """Embeddings, decoder layers, final norm and lm_head (possibly tied to the embeddings)."""

    def __init__(self, spec: DecoderSpec, kernels: Kernels) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, kernels) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, kernels)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.tie()

    def tie(self) -> None:
        """Share lm_head with the embeddings when the config says so (again after moves)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        embeds: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: torch.Tensor,
        meta: AttnMeta,
    ) -> torch.Tensor:
        """embeds (T, hidden); kv (layers, 2, num_slots, max_len, Hkv, D).
        Returns the final-normed hidden states (T, hidden).

        Each residual add is fused into the norm after it (HF: ``x = x + f(x)`` then
        ``norm(x)``, the same values): ``h`` is a sublayer's input, ``x`` the residual."""
        x = embeds
        h = self.layers[0].input_layernorm(x)
        norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for i, (layer, next_norm) in enumerate(zip(self.layers, norms, strict=True)):
            h, x = layer.post_attention_layernorm.add_forward(
                layer.self_attn(h, cos, sin, kv[i], meta), x
            )
            h, x = next_norm.add_forward(layer.mlp(h), x)
        return h

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden) -> float32 logits (N, vocab)."""
        return self.lm_head(hidden).float()

    def load_weights(self, tensors: list[CheckpointTensor], source: str) -> None:
        """Copy the ``decoder.*`` and ``lm_head.weight`` tensors into the modules; raise
        ModelLoadError for a missing or misshapen tensor."""
        params = dict(self.named_parameters(remove_duplicate=False))
        # packed GEMM -> (checkpoint suffix, row slice) of each shard
        spec = self.spec
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        inter = spec.intermediate_size
        shards = {
            "q_proj": ("qkv_proj", slice(0, q)),
            "k_proj": ("qkv_proj", slice(q, q + kv)),
            "v_proj": ("qkv_proj", slice(q + kv, q + 2 * kv)),
            "gate_proj": ("gate_up_proj", slice(0, inter)),
            "up_proj": ("gate_up_proj", slice(inter, 2 * inter)),
        }
        loaded: set[str] = set()
        for item in tensors:
            local = item.key.removeprefix("decoder.")
            if local == "lm_head.weight" and spec.tie_word_embeddings:
                continue  # HF ties it to the embeddings whatever the file holds
            rows = None
            parts = local.split(".")
            if len(parts) >= 2 and parts[-2] in shards:
                packed, rows = shards[parts[-2]]
                target = ".".join([*parts[:-2], packed, parts[-1]])
            else:
                target = local
            if target not in params:
                continue
            copy_into(params[target], item, rows)
            loaded.add(local)
        expected = self._expected_names(shards)
        if spec.tie_word_embeddings:
            expected.discard("lm_head.weight")
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(
                f"checkpoint {source} lacks tensor {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def _expected_names(self, shards: dict[str, tuple[str, slice]]) -> set[str]:
        names: set[str] = set()
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in ("qkv_proj", "gate_up_proj"):
                for shard, (packed, _rows) in shards.items():
                    if packed == parts[-2]:
                        names.add(".".join([*parts[:-2], shard, parts[-1]]))
            else:
                names.add(name)
        return names
