"""Next-token selection over one step's logits, batched.

Order of operations (per row): mask ids banned until ``min_tokens``; repetition penalty (HF:
divide positive / multiply negative logits of every token seen in prompt + output); presence and
frequency penalties (OpenAI: over output tokens); then greedy argmax when ``temperature == 0``,
else temperature, top-k, top-p, min-p and a draw. Logprobs, when asked, are those of the raw
model distribution (``log_softmax`` of the logits before any processing), as vLLM reports them.

Draws use the exponential-race form ``argmax(p / q)``, ``q ~ Exp(1)``, which equals sampling from
``p``. A seeded request draws its ``q`` row from its own generator, seeded once at its first draw,
so its tokens do not depend on which other requests share the step.

Nothing here waits for the device: every choice that depends on the parameters is made on the
host, host-side values reach the device through pinned memory, and the results stay device
tensors (``SamplerOutput``) until the engine loop copies them back (``SamplerOutput.tensors``,
``resolve``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine_core.model.host import to_device
from engine_core.sequence import Sequence
from ipc.messages import TokenLogprobs


@dataclass(slots=True)
class SamplerOutput:
    """Device results of one ``sample``: ``token_ids`` (n,) int64, and when any row asked for
    logprobs, ``logprobs`` = (chosen (n,), top values (n, k), top ids (n, k)) with
    ``num_logprobs[i]`` the number row i asked for (None: none)."""

    token_ids: torch.Tensor
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    num_logprobs: list[int | None] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        """What the host needs back, in the order ``resolve`` takes it."""
        return [self.token_ids, *(self.logprobs or ())]

    def resolve(self, host: list[torch.Tensor]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Token ids and per-row logprobs from host copies of ``tensors()``."""
        tokens = host[0].tolist()
        if self.logprobs is None:
            return tokens, [None] * len(tokens)
        chosen, top_values, top_ids = (t.tolist() for t in host[1:])
        rows: list[TokenLogprobs | None] = [
            None if k is None else TokenLogprobs(chosen[i], top_ids[i][:k], top_values[i][:k])
            for i, k in enumerate(self.num_logprobs)
        ]
        return tokens, rows


def is_plain_greedy(seqs: list[Sequence]) -> bool:
    """Every row is an argmax of the raw logits: greedy, no penalty, no logprobs, no ids banned
    (the runner may then pick the tokens itself, inside its decode graph)."""
    for seq in seqs:
        p = seq.sampling
        if p is None or p.temperature != 0.0 or p.logprobs is not None:
            return False
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            return False
        if seq.num_output_tokens < p.min_tokens:
            return False
    return True


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
        num_logprobs = [p.logprobs for p in params]  # type: ignore[union-attr]
        wants_logprobs = any(k is not None for k in num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        self._ban_until_min_tokens(logits, seqs, eos_token_ids)
        self.apply_penalties(logits, seqs)
        greedy_rows = [p.temperature == 0.0 for p in params]  # type: ignore[union-attr]
        tokens = logits.argmax(dim=-1)
        if not all(greedy_rows):
            temperature = self._column([p.temperature for p in params])  # type: ignore[union-attr]
            drawn = self._draw(logits, seqs, temperature)
            tokens = (
                torch.where(to_device(np.asarray(greedy_rows), self.device), tokens, drawn)
                if any(greedy_rows)
                else drawn
            )
        if raw_logprobs is None:
            return SamplerOutput(tokens)
        return SamplerOutput(
            tokens, _logprob_tensors(raw_logprobs, tokens, num_logprobs), num_logprobs
        )

    def _column(self, values: list[float] | list[int]) -> torch.Tensor:
        return to_device(np.asarray(values, dtype=np.float32), self.device).unsqueeze(1)

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
        return to_device(np.asarray(values, dtype=np.int64), self.device)

    def _draw(
        self, logits: torch.Tensor, seqs: list[Sequence], temperature: torch.Tensor
    ) -> torch.Tensor:
        params = [s.sampling for s in seqs]
        scaled = logits / torch.where(temperature == 0.0, 1.0, temperature)
        top_k = [p.top_k for p in params]  # type: ignore[union-attr]
        top_p = [p.top_p for p in params]  # type: ignore[union-attr]
        if any(top_k) or any(p < 1.0 for p in top_p):
            vocab = logits.shape[1]
            k = self._index([t if t > 0 else vocab for t in top_k]).unsqueeze(1)
            scaled = _top_k_top_p(scaled, k, self._column(top_p))
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


def _top_k_top_p(logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask all but each row's ``k`` ((rows, 1)) most likely tokens, then all but the smallest
    set whose probability reaches ``top_p`` (the most likely token always stays)."""
    vocab = logits.shape[1]
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    ordered = ordered.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    ordered = ordered.masked_fill(mass_before >= top_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def _logprob_tensors(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, num_logprobs: list[int | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_values, top_ids = raw_logprobs.topk(max(k or 0 for k in num_logprobs), dim=-1)
    return chosen, top_values, top_ids
