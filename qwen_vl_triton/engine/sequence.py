"""A request as the engine carries it from admission to its last token.

Token index i of a sequence (prompt then outputs) sits at rope position `positions[:, i]` for
prompt tokens and `i + rope_delta` on all three axes after them. `num_computed` tokens have
their K/V in the cache; a step computes a run of the rest and, when that run reaches the end,
samples the next token from its last row.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qwen_vl_triton.engine.media import PreparedMedia
from qwen_vl_triton.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from qwen_vl_triton.engine.structured import Matcher


class Status(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"    # not holding KV blocks (new, or preempted and to be recomputed)
    RUNNING = "running"    # holding blocks: prefilling in chunks or decoding
    FINISHED = "finished"


@dataclass(eq=False)  # a sequence is itself: compared by identity (its group holds itself)
class Sequence:
    """One request's state.

    prompt_ids [L] with media pads expanded; positions [3, L] int64 (CPU) and rope_delta from
    get_rope_index; media in prompt order; keys: per-prompt-token content keys for the prefix
    cache (token ids, with media pads replaced by values derived from the media's hashes).
    """

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    positions: torch.Tensor
    rope_delta: int
    media: list[PreparedMedia]
    keys: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    num_computed: int = 0
    media_embeds: torch.Tensor | None = None  # [sum of media tokens, H] once encoded
    text: str = ""
    # Incremental detokenization: output tokens [prefix_offset, read_offset) were decoded last step
    # as the context of the next token's text (byte-level tokens may complete a character later).
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    error: BaseException | None = None  # why it ended early (finish_reason "error"): engine/errors.py
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0  # prefix-cache hits of the first admission
    # Prefix-cache salt: only sequences with an equal salt share KV blocks (None: the unsalted pool)
    cache_salt: str | None = None
    # The n samples of one request (params.n): sample `index` of `group` (every sample's list, this
    # one included). Samples 1..n-1 wait in their first sample's `forks` until its prompt is
    # computed; then each takes its own first token from the same logits row and shares the
    # prompt's KV blocks (BlockManager.fork).
    index: int = 0
    group: list[Sequence] = field(default_factory=list)
    forks: list[Sequence] = field(default_factory=list)
    matcher: Matcher | None = None  # structured output (params.structured): what the next token may be

    def __post_init__(self) -> None:
        self.group = self.group or [self]

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        """Prompt token ids, then the generated ones."""
        return self.prompt_ids + self.output_ids

    @property
    def all_keys(self) -> list[int]:
        """Prefix-cache keys of every token: the prompt's, then the output token ids."""
        return self.keys + self.output_ids

    @property
    def media_ready(self) -> bool:
        """Whether its media (if any) are encoded, so that its prompt can be computed."""
        return not self.media or self.media_embeds is not None

    @property
    def is_finished(self) -> bool:
        """Whether the request has stopped (finished, aborted or out of room)."""
        return self.status == Status.FINISHED

    def positions_of(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] rope positions of tokens start..end-1."""
        prompt_len = len(self.prompt_ids)
        parts = []
        if start < prompt_len:
            parts.append(self.positions[:, start:min(end, prompt_len)])
        if end > prompt_len:
            first = max(start, prompt_len)
            parts.append(torch.arange(first, end).add_(self.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def media_rows(self, start: int, end: int, pad_ids: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens start..end-1: (offsets within the run of the media pad tokens [n] int64,
        the rows of media_embeds they take [n] int64); media rows follow prompt order."""
        ids = torch.tensor(self.prompt_ids[:min(end, len(self.prompt_ids))])
        is_pad = (ids == pad_ids[0]) | (ids == pad_ids[1])
        rank = torch.cumsum(is_pad, 0) - 1  # media row of each pad token
        in_run = is_pad[start:]
        offsets = torch.nonzero(in_run).flatten()
        return offsets, rank[start:][in_run]
