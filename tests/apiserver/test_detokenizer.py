"""IncrementalDetokenizer with the default model's byte-level BPE tokenizer, fed one token at
a time as the engine would."""

from __future__ import annotations

from typing import Any

import pytest

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
