"""The engine's running totals, read by the perf report and the server's engine thread."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

# Where a step's host time goes (EngineStats.phase_s), in the order a step spends it. Timed on the
# host: on a GPU / NPU, device time lands in the phase that first waits for it ("forward" ends with
# the logits' finite check, which waits for the device; "sampling" with its tokens' copy to the host).
STEP_PHASES = (
    "schedule",     # the driver's plan (and its broadcast under tensor parallelism) and the scheduler's pick
    "vision",       # decoding frames and encoding images / video slices
    "inputs",       # the forward pass's inputs: token ids, positions, slot mapping, block tables, metadata
    "forward",      # embedding, the model, the logits
    "sampling",     # structured-output masks (what is left of them after the forward), penalties, the draw
    "detokenize",   # new text, stop strings, finish checks
)


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
    at once (after a step's scheduling); phase_s: host seconds of every step() by STEP_PHASES, and
    step_s the whole of them (what the phases leave is bookkeeping: commits, forks, outputs).
    """

    prefill: PhaseTotals = field(default_factory=PhaseTotals)
    decode: PhaseTotals = field(default_factory=PhaseTotals)
    vision_s: float = 0.0
    steps: int = 0
    max_blocks_used: int = 0
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEP_PHASES, 0.0))
    step_s: float = 0.0

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's wall time to phase_s[phase] (one of STEP_PHASES, or "step": step_s)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            if phase == "step":
                self.step_s += elapsed
            else:
                self.phase_s[phase] += elapsed

    def record_step(self, seconds: float, tokens: int, is_prefill: bool, blocks_used: int) -> None:
        """Account one forward pass of `tokens` tokens."""
        phase = self.prefill if is_prefill else self.decode
        phase.seconds += seconds
        phase.tokens += tokens
        self.steps += 1
        self.max_blocks_used = max(self.max_blocks_used, blocks_used)


@dataclass
class StepCost:
    """Running estimates of a forward pass's time, t = decode_s + per_prompt_token_s * prompt tokens,
    from the steps seen (exponential averages, so they follow the batch as it changes).

    decode_s: a step of decodes only; per_prompt_token_s: what each prompt token (a prefill chunk's
    or a recompute's) adds to it. None until a step of that kind has been seen. mixed_steps: steps
    with prompt tokens since the last decode-only one (decode_s grows with the running contexts:
    a long prefill must leave a decode-only step now and then, or its tokens are blamed for it).
    """

    decode_s: float | None = None
    per_prompt_token_s: float | None = None
    mixed_steps: int = 0
    weight: float = 0.2  # of the newest step

    def record(self, seconds: float, prompt_tokens: int) -> None:
        """Account one forward pass that computed `prompt_tokens` prompt tokens (besides its decodes)."""
        if prompt_tokens == 0:
            self.decode_s = self._mix(self.decode_s, seconds)
            self.mixed_steps = 0
        else:
            self.mixed_steps += 1
            per_token = max(0.0, seconds - (self.decode_s or 0.0)) / prompt_tokens
            self.per_prompt_token_s = self._mix(self.per_prompt_token_s, per_token)

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def prompt_tokens_within(self, seconds: float) -> int | None:
        """The most prompt tokens whose estimated time fits `seconds` (at least 1); None while
        unknown (no prefill seen yet)."""
        if not self.per_prompt_token_s:  # unknown, or too small to measure
            return None
        return max(1, int(seconds / self.per_prompt_token_s))
