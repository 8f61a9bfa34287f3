"""Commands that change which requests the engine holds, as typed values.

The server's handlers put them in the engine thread's inbox (serving/async_engine.py), and under
tensor parallelism rank 0 records the ones it applied and broadcasts them to the other ranks
before each step (engine/llm.py), which apply them in the same order; the broadcast ends with
the step's StepPlan, what rank 0 chose for it from its own timings.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_vl_triton.engine.media_encoder import EncodeWork
from qwen_vl_triton.engine.preprocess import PreparedRequest


@dataclass(frozen=True)
class Add:
    """Queue a prepared request under request_id."""

    request_id: str
    request: PreparedRequest


@dataclass(frozen=True)
class Abort:
    """Stop a request and free what it holds."""

    request_id: str


@dataclass(frozen=True)
class Stop:
    """Stop the engine: the engine thread ends; under tensor parallelism the other ranks' loops end."""


@dataclass(frozen=True)
class StepPlan:
    """What the driver chose for one step from its own timings, which every rank follows: the
    vision work (images by content hash, videos' uint8 frames) and the most prompt tokens the
    scheduler may take (None: max_prefill_tokens alone)."""

    encode: EncodeWork
    prompt_budget: int | None


Command = Add | Abort | StepPlan | Stop
