"""Sampler tests on hand-made logits and sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_core.sampler import Sampler, is_plain_greedy
from engine_core.sequence import Sequence
from ipc.messages import EngineRequest, SamplingParams

VOCAB = 50


def make_seq(
    prompt: list[int] | None = None, output: list[int] | None = None, **params: object
) -> Sequence:
    request = EngineRequest(
        "r",
        np.array(prompt or [1, 2, 3], dtype=np.int32),
        sampling=SamplingParams(max_tokens=64, **params),  # type: ignore[arg-type]
    )
    seq = Sequence(request, b"c", 0)
    for t in output or []:
        seq.append_token(t)
    return seq


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def frequencies(tokens: list[int], vocab: int) -> np.ndarray:
    return np.bincount(np.array(tokens), minlength=vocab) / len(tokens)


def test_greedy_is_argmax() -> None:
    logits = random_logits(6, 0)
    seqs = [make_seq(temperature=0.0) for _ in range(6)]
    out = Sampler(0, torch.device("cpu")).sample(logits, seqs, ())
    tokens, logprobs = out.resolve(out.tensors())
    assert tokens == logits.argmax(dim=-1).tolist()
    assert logprobs == [None] * 6


def test_top_k_one_is_greedy() -> None:
    logits = random_logits(6, 1)
    seqs = [make_seq(temperature=1.5, top_k=1) for _ in range(6)]
    out = Sampler(0, torch.device("cpu")).sample(logits, seqs, ())
    assert out.token_ids.tolist() == logits.argmax(dim=-1).tolist()


def draws(steps: int, seed: int | None, neighbours: int, sampler_seed: int) -> list[int]:
    """Tokens a seeded row gets over ``steps`` steps, sharing each step with ``neighbours``."""
    sampler = Sampler(sampler_seed, torch.device("cpu"))
    seq = make_seq(temperature=1.0, seed=seed)
    others = [make_seq(temperature=0.7, top_p=0.9) for _ in range(neighbours)]
    got = []
    for step in range(steps):
        logits = random_logits(1 + neighbours, 100 + step)
        logits[neighbours] = random_logits(1, 100 + step)[0]  # same row whatever the batch
        batch = [*others, seq]
        got.append(int(sampler.sample(logits, batch, ()).token_ids[-1]))
        seq.append_token(got[-1])
    return got


def test_seeded_sampling_reproducible_and_independent_of_neighbours() -> None:
    alone = draws(12, seed=1234, neighbours=0, sampler_seed=0)
    crowded = draws(12, seed=1234, neighbours=5, sampler_seed=99)
    assert alone == crowded
    assert draws(12, seed=4321, neighbours=0, sampler_seed=0) != alone


def test_temperature_sampling_matches_distribution() -> None:
    n = 4000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0])
    logits = base.repeat(n, 1)
    seqs = [make_seq(temperature=0.5) for _ in range(n)]
    tokens = Sampler(0, torch.device("cpu")).sample(logits, seqs, ()).token_ids.tolist()
    expected = torch.softmax(base / 0.5, dim=-1).numpy()
    np.testing.assert_allclose(frequencies(tokens, 4), expected, atol=0.03)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 2}, [0, 1]),
        ({"top_p": 0.7}, [0, 1]),  # 0.5 + 0.3 reaches 0.7
        ({"min_p": 0.5}, [0, 1]),  # floor 0.25
        ({"top_k": 3, "top_p": 0.95}, [0, 1, 2]),
    ],
)
def test_filters_keep_only_allowed_tokens(params: dict[str, float], allowed: list[int]) -> None:
    n = 3000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(n, 1)
    seqs = [make_seq(temperature=1.0, **params) for _ in range(n)]
    tokens = Sampler(0, torch.device("cpu")).sample(logits, seqs, ()).token_ids.tolist()
    freq = frequencies(tokens, 4)
    assert set(np.flatnonzero(freq)) == set(allowed)
    renormalized = probs[allowed] / probs[allowed].sum()
    np.testing.assert_allclose(freq[allowed], renormalized.numpy(), atol=0.04)


def test_repetition_penalty_hf_semantics() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, :6] = torch.tensor([4.0, -1.0, 3.0, 2.0, -2.0, 1.0])
    seq = make_seq(prompt=[0, 1], output=[4], repetition_penalty=2.0)
    Sampler(0, torch.device("cpu")).apply_penalties(logits, [seq])
    expected = torch.tensor([2.0, -2.0, 3.0, 2.0, -4.0, 1.0])
    torch.testing.assert_close(logits[0, :6], expected)


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, 0], logits[:, 2] = 4.0, 3.0
    plain = make_seq(prompt=[0], temperature=0.0)
    penalized = make_seq(prompt=[0], temperature=0.0, repetition_penalty=2.0)
    out = Sampler(0, torch.device("cpu")).sample(logits, [plain, penalized], ())
    assert out.token_ids.tolist() == [0, 2]


def test_presence_and_frequency_penalties_openai_semantics() -> None:
    logits = torch.ones(2, VOCAB)
    penalized = make_seq(prompt=[7], output=[3, 3, 5], presence_penalty=1.0, frequency_penalty=0.5)
    untouched = make_seq(prompt=[7], output=[3, 3, 5])
    Sampler(0, torch.device("cpu")).apply_penalties(logits, [penalized, untouched])
    expected = torch.ones(VOCAB)
    expected[3] = 1.0 - 2 * 0.5 - 1.0
    expected[5] = 1.0 - 0.5 - 1.0
    torch.testing.assert_close(logits[0], expected)  # the prompt token 7 is not penalized
    torch.testing.assert_close(logits[1], torch.ones(VOCAB))


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(3, VOCAB)
    logits[:, 9], logits[:, 8], logits[:, 4] = 10.0, 9.0, 1.0
    early = make_seq(output=[1], temperature=0.0, min_tokens=2, stop_token_ids=[8])
    done = make_seq(output=[1, 1], temperature=0.0, min_tokens=2, stop_token_ids=[8])
    ignoring = make_seq(output=[1], temperature=0.0, min_tokens=2, ignore_eos=True)
    out = Sampler(0, torch.device("cpu")).sample(logits, [early, done, ignoring], (9,))
    assert out.token_ids.tolist() == [4, 9, 9]


def test_logprobs_are_raw_log_softmax_with_top_alternatives() -> None:
    logits = random_logits(3, 7)
    seqs = [
        make_seq(temperature=0.0, logprobs=3),
        make_seq(temperature=0.8, repetition_penalty=1.5, logprobs=0),
        make_seq(temperature=0.0),
    ]
    out = Sampler(0, torch.device("cpu")).sample(logits, seqs, ())
    tokens, (first, second, third) = out.resolve(out.tensors())
    reference = torch.log_softmax(logits, dim=-1)
    assert first is not None and second is not None and third is None
    assert first.logprob == pytest.approx(reference[0, tokens[0]].item(), abs=1e-6)
    top = reference[0].topk(3)
    assert first.top_ids == top.indices.tolist()
    np.testing.assert_allclose(first.top_logprobs, top.values.numpy(), atol=1e-6)
    assert second.logprob == pytest.approx(reference[1, tokens[1]].item(), abs=1e-6)
    assert second.top_ids == [] and second.top_logprobs == []


def test_plain_greedy_only_without_penalties_bans_or_logprobs() -> None:
    assert is_plain_greedy([make_seq(temperature=0.0), make_seq(temperature=0.0, top_p=0.5)])
    for params in (
        {"temperature": 0.7},
        {"temperature": 0.0, "logprobs": 0},
        {"temperature": 0.0, "repetition_penalty": 1.1},
        {"temperature": 0.0, "presence_penalty": 0.5},
        {"temperature": 0.0, "frequency_penalty": -0.5},
        {"temperature": 0.0, "min_tokens": 2},
    ):
        assert not is_plain_greedy([make_seq(temperature=0.0), make_seq(**params)]), params
    # min_tokens already reached: nothing is banned any more
    assert is_plain_greedy([make_seq(output=[4, 5], temperature=0.0, min_tokens=2)])
