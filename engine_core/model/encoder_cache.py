"""Image-encoder outputs keyed by content hash, LRU within a byte budget.

An entry referenced by an admitted request is pinned: eviction skips it, so a request that was
accepted because its image was cached (``pixel_values=None``) can always run. Pinned entries
may push the total over budget; unpinned ones are evicted oldest-first until it fits again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class _Entry:
    embeds: torch.Tensor
    nbytes: int
    holders: set[str] = field(default_factory=set)


class EncoderCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.total_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_pinned(self) -> int:
        """Entries some admitted request still holds."""
        return sum(1 for e in self._entries.values() if e.holders)

    def acquire(self, content_hash: str, request_id: str) -> torch.Tensor | None:
        """Pin the entry for ``request_id`` and return it (None when absent)."""
        entry = self._entries.get(content_hash)
        if entry is None:
            return None
        self._entries.move_to_end(content_hash)
        entry.holders.add(request_id)
        return entry.embeds

    def put(self, content_hash: str, embeds: torch.Tensor, request_id: str) -> None:
        """Insert (pinned for ``request_id``), then evict unpinned entries beyond the budget."""
        if content_hash not in self._entries:
            nbytes = embeds.numel() * embeds.element_size()
            self._entries[content_hash] = _Entry(embeds, nbytes)
            self.total_bytes += nbytes
        self.acquire(content_hash, request_id)
        self._evict()

    def release(self, content_hash: str, request_id: str) -> None:
        """Unpin; the entry stays cached while the budget allows."""
        entry = self._entries.get(content_hash)
        if entry is not None:
            entry.holders.discard(request_id)
            self._evict()

    def clear(self) -> None:
        """Drop every unpinned entry."""
        for key in [k for k, e in self._entries.items() if not e.holders]:
            self._drop(key)

    def _evict(self) -> None:
        if self.total_bytes <= self.budget_bytes:  # the usual case: no walk over every key
            return
        for key in list(self._entries):
            if self.total_bytes <= self.budget_bytes:
                return
            if not self._entries[key].holders:
                self._drop(key)

    def _drop(self, key: str) -> None:
        self.total_bytes -= self._entries.pop(key).nbytes
