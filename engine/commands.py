"""Commands that change which requests the engine holds, as typed values.

The server's handlers put them in the engine thread's inbox (serving/async_engine.py), and under
tensor parallelism rank 0 records the ones it applied and broadcasts them to the other ranks
before each step (engine/llm.py), which apply them in the same order; the broadcast ends with
the step's Encode, the vision work rank 0 chose for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.media_encoder import EncodeWork
from engine.preprocess import PreparedRequest


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
class Encode:
    """Tensor parallelism: the step's vision work (images by content hash, videos' uint8 frames)."""

    work: EncodeWork


Command = Add | Abort | Encode | Stop
