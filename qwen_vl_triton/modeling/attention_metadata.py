"""What one forward pass needs to know about where its tokens sit in the paged KV cache.

The decoder writes each new token's K/V through `slot_mapping` and attends through
`block_tables`; the same metadata serves a plain prompt (one sequence, fresh blocks), a batch
of prefills, chunked prefill / prefix-cache hits, and decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Paged-attention metadata for one step over B sequences and T new tokens (packed).

    slot_mapping:  [T] int64   cache slot of each new token (block_id * block_size + offset);
                               negative = padding, not written.
    block_tables:  [B, max_blocks] int32   KV blocks of each sequence, in order.
    context_lens:  [B] int32   tokens of each sequence in the cache after this step's writes.
    cu_seqlens_q:  [B+1] int32 prefix sums of the new (query) tokens per sequence.
    max_query_len: the longest run of new tokens of one sequence in this step.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int

    @classmethod
    def one_sequence(cls, start: int, count: int, max_blocks: int,
                     device: torch.device | str | None = None) -> AttentionMetadata:
        """One sequence whose tokens start .. start + count - 1 are new, cached in blocks 0, 1, 2, ...
        in order (a single prompt, or its decode steps, outside the engine's block manager)."""
        return cls(
            slot_mapping=torch.arange(start, start + count, dtype=torch.int64, device=device),
            block_tables=torch.arange(max_blocks, dtype=torch.int32, device=device)[None],
            context_lens=torch.tensor([start + count], dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor([0, count], dtype=torch.int32, device=device),
            max_query_len=count,
        )

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token (the paged decode kernel)."""
        return self.max_query_len == 1
