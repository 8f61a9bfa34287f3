"""The engine's running totals, read by the perf report and the server's engine thread."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PhaseTotals:
    """Wall seconds of the forward passes and sampling of one kind of step, and their tokens."""

    seconds: float = 0.0
    tokens: int = 0


@dataclass
class EngineStats:
    """Totals since the LLM was built. A step with any prompt run counts as prefill (its decode
    rows included), the others as decode.

    vision_s: media encoding; steps: forward passes run; max_blocks_used: the most KV blocks held
    at once (after a step's scheduling).
    """

    prefill: PhaseTotals = field(default_factory=PhaseTotals)
    decode: PhaseTotals = field(default_factory=PhaseTotals)
    vision_s: float = 0.0
    steps: int = 0
    max_blocks_used: int = 0

    def record_step(self, seconds: float, tokens: int, is_prefill: bool, blocks_used: int) -> None:
        """Account one forward pass of `tokens` tokens."""
        phase = self.prefill if is_prefill else self.decode
        phase.seconds += seconds
        phase.tokens += tokens
        self.steps += 1
        self.max_blocks_used = max(self.max_blocks_used, blocks_used)
