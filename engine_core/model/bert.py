"""The encoder-only runner: BERT-family sentence-embedding models through HF ``AutoModel``.

No KV cache and no generation: each pooling request is run whole in one chunk (the scheduler
prefills pooling requests in one chunk) and pooled over its tokens. Normalisation is the
caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModel

from engine_core.batch import Chunk, ImageRef, RunnerFacts, StepResult
from engine_core.model.errors import ModelLoadError
from engine_core.model.runner import ModelRunner, context_length, step_token_budget
from engine_core.model.spec import ModelSpec
from ipc.config import EngineConfig
from ipc.messages import EngineRequest

_POOLINGS = ("mean", "cls", "last")


class EncoderRunner(ModelRunner):
    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.device, self.dtype = device, dtype
        try:
            self.model = AutoModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load encoder model from {model_dir}: {e}") from e
        self.model.to(device).eval()
        max_model_len = context_length(
            config, int(getattr(spec.config, "max_position_embeddings", 512))
        )
        self.vocab_size = int(spec.config.vocab_size)
        self.facts = RunnerFacts(
            model_dir=model_dir,
            max_model_len=max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=(),
            num_slots=config.max_num_seqs,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=step_token_budget(config, device),
            supports_images=False,
            supports_embeddings=True,
            supports_generation=False,
            poolings=_POOLINGS,
            image_token_id=None,
        )

    def admit(self, request: EngineRequest) -> None:
        """Nothing is kept per request."""

    def has_image(self, content_hash: str) -> bool:
        return False

    @torch.no_grad()
    def execute(
        self, chunks: list[Chunk], *, encodes: Sequence[ImageRef] = (), greedy: bool = False
    ) -> StepResult:
        """Pad the chunks into one batch, run the encoder, pool each row over its mask."""
        pooled: dict[str, torch.Tensor] = {}
        todo = [c for c in chunks if c.wants_pooled and c.request.pooling is not None]
        if todo:
            lens = [int(c.token_ids.size) for c in todo]
            ids = torch.zeros(len(todo), max(lens), dtype=torch.int64)
            mask = torch.zeros(len(todo), max(lens), dtype=torch.int64)
            for i, (c, n) in enumerate(zip(todo, lens, strict=True)):
                ids[i, :n] = torch.from_numpy(c.token_ids.astype(np.int64))
                mask[i, :n] = 1
            hidden = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).last_hidden_state.float()
            weights = mask.to(self.device, torch.float32)[..., None]  # (B, L, 1)
            means = (hidden * weights).sum(1) / weights.sum(1)
            for i, (c, n) in enumerate(zip(todo, lens, strict=True)):
                kind = c.request.pooling.pooling  # type: ignore[union-attr]
                vec = means[i] if kind == "mean" else hidden[i, 0 if kind == "cls" else n - 1]
                pooled[c.request.request_id] = vec
        return StepResult(logits=torch.empty(0, self.vocab_size, device=self.device), pooled=pooled)

    def release(self, request_id: str) -> None:
        """Nothing is kept per request."""
