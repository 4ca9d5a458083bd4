"""IncrementalDetokenizer with the default model's byte-level BPE tokenizer, fed one token at
a time as the engine would."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apiserver.detokenizer import IncrementalDetokenizer


def stream(tokenizer: Any, text: str, stop: list[str]) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, stop)
    pieces = []
    for token in tokenizer.encode(text):
        pieces.append(detok.push([token]))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    return pieces, detok


def test_multibyte_characters_never_split(tokenizer: Any) -> None:
    text = "naïve café — 日本語のテキスト 🙂🚀 done"
    pieces, detok = stream(tokenizer, text, [])
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in p for p in pieces)
    assert detok.num_tokens == len(tokenizer.encode(text))


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["brown fox"], "the quick "),
        (["zzz", "quick"], "the "),
        (["jumps over"], "the quick brown fox "),
        (["not present"], "the quick brown fox jumps over"),
    ],
)
def test_stop_strings_truncate(tokenizer: Any, stop: list[str], expected: str) -> None:
    pieces, detok = stream(tokenizer, "the quick brown fox jumps over", stop)
    assert "".join(pieces) == expected
    assert detok.stopped == (stop != ["not present"])


def test_possible_stop_prefix_is_held_back(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, ["fox!"])
    shown = ""
    for token in tokenizer.encode("the quick fox"):
        shown += detok.push([token])
    assert shown == "the quick "  # "fox" could still become "fox!"
    assert detok.flush() == "fox"


class _CharTokenizer:
    """One token per character (ids are code points): text pieces are fully controlled."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def _held_back_reference(text: str, stops: list[str]) -> int:
    return max((k for s in stops if s for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@given(
    text=st.text(alphabet="ab", max_size=60),
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=8), min_size=1, max_size=4),
    cut=st.integers(1, 5),
)
def test_held_back_text_matches_brute_force(text: str, stops: list[str], cut: int) -> None:
    """What is shown while streaming equals the text minus its longest stop-prefix suffix,
    however the text arrives (the incremental search may skip nothing)."""
    detok = IncrementalDetokenizer(_CharTokenizer(), stops)
    shown = ""
    for start in range(0, len(text), cut):
        shown += detok.push([ord(c) for c in text[start : start + cut]])
        if detok.stopped:
            break
        assert shown == detok.text[: len(detok.text) - _held_back_reference(detok.text, stops)]
    expected = text  # cut at the first stop found once a piece arrives, as a stream must
    for end in [*range(cut, len(text), cut), len(text)]:
        hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if hits:
            expected = text[: min(hits)]
            break
    assert detok.stopped == (expected != text or any(s in text for s in stops))
    assert shown + detok.flush() == expected
