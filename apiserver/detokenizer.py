"""Incremental detokenization for one request: UTF-8 safe deltas and stop strings.

Byte-level BPE splits multibyte characters over several tokens; decoding a partial character
gives U+FFFD, so text ending in it is held back until the next token completes it. A possible
stop-string prefix at the end of the text is also held back while streaming, so a client never
sees text that a later stop hit would have truncated.

Stop strings cost work on every token, so both searches are bounded by what is new: a hit is
looked for only where new text could complete one, and each stop's held-back prefix can only
have grown by the characters added since the last look (so the candidates tried over a
request's life add up to the text's length, not to its square).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids with :meth:`push`, get new text; :attr:`stopped` turns True on a stop hit."""

    def __init__(self, tokenizer: Any, stop: list[str], skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""
        self._emitted = 0
        self._searched = 0
        self._matched = [0] * len(self._stop)  # per stop: the text suffix that starts it
        self._grown = 0  # characters added since the held-back prefixes were last found
        self.stopped = False
        self.num_tokens = 0

    @property
    def text(self) -> str:
        """All text so far (truncated at a stop string once one is hit)."""
        return self._text

    def push(self, token_ids: list[int]) -> str:
        """Add new tokens; return the text that is now safe to show."""
        if self.stopped or not token_ids:
            return ""
        self.num_tokens += len(token_ids)
        self._ids.extend(token_ids)
        self._append(self._decode_new(final=False))
        return self._release(final=False)

    def flush(self) -> str:
        """The request finished: release everything still held back."""
        if not self.stopped:
            self._append(self._decode_new(final=True))
        return self._release(final=True)

    def _decode_new(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], **self._kw())
        full: str = decode(self._ids[self._prefix_offset :], **self._kw())
        if not final and full.endswith(_REPLACEMENT):
            return ""
        # Decoding with a little left context keeps tokenizer spacing rules (leading spaces,
        # merges) right; the new text is what the new tokens added to that context.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def _kw(self) -> dict[str, bool]:
        return {"skip_special_tokens": self._skip_special}

    def _append(self, piece: str) -> None:
        if not piece:
            return
        self._text += piece
        self._grown += len(piece)
        longest = max((len(s) for s in self._stop), default=0)
        start = max(0, self._searched - longest + 1)
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True
        self._searched = len(self._text)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        if not final and not self.stopped:
            end -= self._held_back()
        end = max(end, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest text suffix that could still grow into a stop string."""
        text, grown = self._text, self._grown
        self._grown = 0
        for i, s in enumerate(self._stop):
            k = min(len(s) - 1, len(text), self._matched[i] + grown)
            while k > 0 and not text.endswith(s[:k]):
                k -= 1
            self._matched[i] = k
        return max(self._matched, default=0)
