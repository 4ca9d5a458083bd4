"""Next-token selection over one step's logits, batched.

Order of operations (per row): mask ids banned until ``min_tokens``; repetition penalty (HF:
divide positive / multiply negative logits of every token seen in prompt + output); presence and
frequency penalties (OpenAI: over output tokens); then greedy argmax when ``temperature == 0``,
else temperature, top-k, top-p, min-p and a draw. Logprobs, when asked, are those of the raw
model distribution (``log_softmax`` of the logits before any processing), as vLLM reports them.

Draws use the exponential-race form ``argmax(p / q)``, ``q ~ Exp(1)``, which equals sampling from
``p``. A seeded request draws its ``q`` row from its own generator, seeded once at its first draw,
so its tokens do not depend on which other requests share the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_core.sequence import Sequence
from ipc.messages import TokenLogprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    """Stateless apart from the generator of unseeded requests (seeded from the engine config)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]
    ) -> SamplerOutput:
        """``logits`` (len(seqs), vocab) float32; row i is the next-token logits of ``seqs[i]``."""
        params = [s.sampling for s in seqs]
        assert all(p is not None for p in params) and logits.shape[0] == len(seqs)
        logits = logits.to(self.device, torch.float32, copy=True)
        wants_logprobs = any(p.logprobs is not None for p in params)  # type: ignore[union-attr]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        self._ban_until_min_tokens(logits, seqs, eos_token_ids)
        self.apply_penalties(logits, seqs)
        temperature = self._column([p.temperature for p in params])  # type: ignore[union-attr]
        is_greedy = temperature.squeeze(1) == 0.0
        tokens = logits.argmax(dim=-1)
        if not bool(is_greedy.all()):
            drawn = self._draw(logits, seqs, temperature)
            tokens = torch.where(is_greedy, tokens, drawn)
        token_list = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, tokens, seqs)
        return SamplerOutput(token_list, logprobs)

    def _column(self, values: list[float] | list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(1)

    def _ban_until_min_tokens(
        self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: tuple[int, ...]
    ) -> None:
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        eos = np.asarray(eos_token_ids, dtype=np.int64)
        for i, seq in enumerate(seqs):
            params = seq.sampling
            assert params is not None
            if seq.num_output_tokens >= params.min_tokens:
                continue
            # An id in both lists is set to -inf twice: no need to merge them.
            banned = seq.stop_id_array if params.ignore_eos else np.append(seq.stop_id_array, eos)
            rows.append(np.full(len(banned), i, dtype=np.int64))
            cols.append(banned)
        if rows:
            index = (self._index(np.concatenate(rows)), self._index(np.concatenate(cols)))
            logits[index] = float("-inf")

    def apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Repetition, presence and frequency penalties, in place on ``logits`` (rows, vocab)."""
        params = [s.sampling for s in seqs]
        rep = [p.repetition_penalty for p in params]  # type: ignore[union-attr]
        pres = [p.presence_penalty for p in params]  # type: ignore[union-attr]
        freq = [p.frequency_penalty for p in params]  # type: ignore[union-attr]
        has_rep = any(r != 1.0 for r in rep)
        if not has_rep and not any(pres) and not any(freq):
            return
        out_counts = self._counts([s.output_ids for s in seqs], logits.shape[1])
        if has_rep:
            seen = (self._counts([s.token_ids for s in seqs], logits.shape[1]) > 0).float()
            penalty = self._column(rep)
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits.copy_(torch.where(seen > 0, penalized, logits))
        logits -= self._column(freq) * out_counts + self._column(pres) * (out_counts > 0).float()

    def _counts(self, id_rows: list[np.ndarray], vocab: int) -> torch.Tensor:
        """(len(id_rows), vocab) float32: how often each token occurs in each row."""
        counts = torch.zeros(len(id_rows), vocab, dtype=torch.float32, device=self.device)
        lengths = [len(r) for r in id_rows]
        if sum(lengths) == 0:
            return counts
        rows = np.repeat(np.arange(len(id_rows)), lengths)
        cols = np.concatenate(id_rows).astype(np.int64)
        ones = torch.ones(len(cols), dtype=torch.float32, device=self.device)
        counts.index_put_((self._index(rows), self._index(cols)), ones, accumulate=True)
        return counts

    def _index(self, values: list[int] | np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

    def _draw(
        self, logits: torch.Tensor, seqs: list[Sequence], temperature: torch.Tensor
    ) -> torch.Tensor:
        params = [s.sampling for s in seqs]
        scaled = logits / torch.where(temperature == 0.0, 1.0, temperature)
        top_k = [p.top_k for p in params]  # type: ignore[union-attr]
        top_p = [p.top_p for p in params]  # type: ignore[union-attr]
        if any(top_k) or any(p < 1.0 for p in top_p):
            scaled = _top_k_top_p(scaled, top_k, self._column(top_p))
        min_p = [p.min_p for p in params]  # type: ignore[union-attr]
        if any(min_p):
            probs = torch.softmax(scaled, dim=-1)
            floor = self._column(min_p) * probs.max(dim=-1, keepdim=True).values
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._generator)
        for i, seq in enumerate(seqs):
            seed = seq.sampling.seed  # type: ignore[union-attr]
            if seed is None:
                continue
            if seq.generator is None:
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            noise[i].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: torch.Tensor) -> torch.Tensor:
    """Mask all but each row's ``top_k`` (0: all) most likely tokens, then all but the smallest
    set whose probability reaches ``top_p`` (the most likely token always stays)."""
    vocab = logits.shape[1]
    ordered, order = logits.sort(dim=-1, descending=True)
    k = torch.tensor([t if t > 0 else vocab for t in top_k], device=logits.device).unsqueeze(1)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    ordered = ordered.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    ordered = ordered.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def _gather_logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, seqs: list[Sequence]
) -> list[TokenLogprobs | None]:
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    num_top = max(s.sampling.logprobs or 0 for s in seqs)  # type: ignore[union-attr]
    top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    result: list[TokenLogprobs | None] = []
    for i, seq in enumerate(seqs):
        k = seq.sampling.logprobs  # type: ignore[union-attr]
        if k is None:
            result.append(None)
        else:
            result.append(TokenLogprobs(chosen[i], top_ids_list[i][:k], top_values_list[i][:k]))
    return result
