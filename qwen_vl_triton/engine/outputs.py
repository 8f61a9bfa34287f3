"""What the engine gives back for a request: vLLM's shape, a RequestOutput holding one
CompletionOutput per sample (SamplingParams.n).

    out = llm.generate(prompt, SamplingParams(n=3, seed=0))[0]
    for sample in out.outputs:           # index order: sample k was drawn with seed + k
        print(sample.index, sample.finish_reason, sample.text)

Both are snapshots of the whole output so far, not deltas: `LLM.step()` returns one for each
request that changed in that step, with every sample (an unchanged or not yet started sample
included, so that `len(outputs) == n` always holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CompletionOutput", "RequestOutput"]


@dataclass
class CompletionOutput:
    """One sample of a request, its output so far.

    token_ids [T] the generated token ids; token_logprobs [T] the log-probability of each under the
    processed distribution; top_logprobs [T] the (token id, logprob) pairs of the request's
    `logprobs` most likely tokens at each position (None where not asked for); token_times [T]
    seconds from the request's arrival to each token. finish_reason: None while it runs, else
    "stop", "length", "abort" or "error" (then `error` says why: engine/errors.py).
    """

    index: int
    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]
    finish_reason: str | None
    token_times: list[float]
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Whether this sample has ended."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state: its prompt's accounting and its samples' outputs (`outputs`, one per
    sample, in index order). `finished` once every sample has ended. ttft_s: seconds from
    arrival to the first token (every sample's first token comes from the same logits row);
    latency_s: to the last sample's end (or to now, while one runs). media_adjustments: videos
    shrunk to fit the context, one line each."""

    request_id: str
    prompt_tokens: int
    cached_prompt_tokens: int
    outputs: list[CompletionOutput]
    finished: bool
    ttft_s: float | None
    latency_s: float
    media_adjustments: list[str] = field(default_factory=list)

    @property
    def error(self) -> BaseException | None:
        """Why the request ended early: the first failed sample's error (None if none failed)."""
        return next((o.error for o in self.outputs if o.error is not None), None)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over every sample."""
        return sum(len(o.token_ids) for o in self.outputs)
