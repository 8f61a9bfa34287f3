"""Vision-encoder outputs kept by media content hash, so a repeated image or clip is encoded once.

A byte budget bounds it; the least recently used entries go first. An entry larger than the
whole budget is not cached (the caller still has its embeddings: too large to keep is not an error).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """LRU map: media content hash -> vision embeddings [tokens, H], bounded by max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        """Embeddings [tokens, H] stored under `key`, refreshed as most recently used."""
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: str, embeds: torch.Tensor) -> bool:
        """Store embeddings, evicting the least recently used; False when larger than the budget."""
        size = embeds.numel() * embeds.element_size()
        if size > self.max_bytes or key in self.entries:
            return key in self.entries
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = embeds
        self.bytes += size
        return True
