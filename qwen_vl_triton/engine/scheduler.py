"""Continuous batching: which tokens of which sequences the next forward pass computes.

Every step, each running sequence contributes its next run of uncomputed tokens: one token when
decoding, a chunk of at most the remaining prefill budget when prefilling (chunked prefill), so
decodes and prefills share one forward pass. Waiting sequences are admitted in arrival order while
the batch has room (`max_batch_size`), the step has prefill budget (`max_prefill_tokens`) and the
block manager has blocks for the whole sequence (prefix-cache hits, under the sequence's cache
salt, count as computed). A sequence whose media are still being encoded (over several steps:
engine/media_encoder.py) is admitted and holds its blocks, but gets no run until they are
ready. When a decoding sequence needs a block and none is free, the most recently admitted
sequence is preempted: its blocks are freed and it waits, first in line, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwen_vl_triton.engine.block_manager import BlockManager
from qwen_vl_triton.engine.sequence import Sequence, Status


@dataclass
class Run:
    """Tokens start..start+count-1 of `seq` are computed this step."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether this run reaches the sequence's end, so its last row yields the next token."""
        return self.start + self.count == self.seq.num_tokens


@dataclass
class Batch:
    """One step's work: the runs (decodes and prefill chunks, in running order)."""

    runs: list[Run]

    @property
    def num_tokens(self) -> int:
        """Tokens computed in this step (the forward pass's T)."""
        return sum(r.count for r in self.runs)

    @property
    def prompt_tokens(self) -> int:
        """Tokens of prefill chunks and recomputes (every run but the one-token decodes)."""
        return sum(r.count for r in self.runs if r.count > 1 or r.start < len(r.seq.prompt_ids))


class Scheduler:
    """Waiting and running queues over one BlockManager."""

    def __init__(self, blocks: BlockManager, max_batch_size: int, max_prefill_tokens: int):
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be >= 1")
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the end of the waiting line."""
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_first(self, seq: Sequence) -> None:
        """Queue a sequence first in line, holding no blocks (its tokens are recomputed on admission)."""
        seq.status = Status.WAITING
        seq.num_computed = 0
        self.waiting.appendleft(seq)

    def add_running(self, seq: Sequence) -> None:
        """Run a sequence that already holds its blocks (a sample forked off another's prompt)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        """Whether any sequence is waiting or running."""
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if self.blocks.has_seq(seq.seq_id):
            self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        self.add_first(seq)
        self.num_preemptions += 1

    def schedule(self, prompt_budget: int | None = None) -> Batch:
        """Pick this step's runs; an empty batch when nothing can run. prompt_budget: fewer prompt
        tokens than max_prefill_tokens for this step (the engine's latency bound), if given."""
        batch = Batch(runs=[])
        budget = self.max_prefill_tokens if prompt_budget is None else min(self.max_prefill_tokens, prompt_budget)
        for seq in list(self.running):
            if seq.status != Status.RUNNING or not seq.media_ready:  # preempted in this loop; media encoding
                continue
            remaining = seq.num_tokens - seq.num_computed
            if remaining == 1:
                while not self.blocks.can_append(seq.seq_id, seq.num_tokens):
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
                if seq.status != Status.RUNNING:
                    continue
                self.blocks.append_slots(seq.seq_id, seq.num_tokens)
                batch.runs.append(Run(seq, seq.num_computed, 1))
            elif budget > 0:
                count = min(remaining, budget)
                budget -= count
                batch.runs.append(Run(seq, seq.num_computed, count))
        batch.runs = [r for r in batch.runs if r.seq.status == Status.RUNNING]

        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq.all_keys, seq.num_tokens, seq.cache_salt):
                break
            self.waiting.popleft()
            cached = self.blocks.allocate(seq.seq_id, seq.all_keys, seq.num_tokens, seq.cache_salt)
            if not seq.output_ids:  # the first admission, not a recompute after preemption
                seq.num_cached_prompt_tokens = cached
            seq.num_computed = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.media_ready:
                count = min(seq.num_tokens - cached, budget)
                budget -= count
                batch.runs.append(Run(seq, cached, count))
        return batch
