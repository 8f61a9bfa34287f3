"""Sampling parameters and the batched sampler: penalties, temperature, top-k, top-p, draws.

Logprobs are always those of the model's raw distribution (log-softmax of the logits before any
penalty or transform, and before a structured output's token mask: a constrained row's top logprobs
may name tokens it could not sample), as docs/DESIGN.md ("CLI contracts", generate.py's
--output_json) promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from qwen_vl_triton.engine.structured import StructuredOutput

_GREEDY_BELOW = 1e-5
MAX_N = 16  # samples per request


@dataclass
class SamplingParams:
    """Per-request sampling settings (OpenAI / vLLM semantics).

    max_tokens: output tokens at most; None: all the room the prompt leaves under max_seq_len (and
    under the server's max_iter_times). Preprocessor.build resolves it, and refuses a max_tokens
    that the prompt leaves no room for."""

    max_tokens: int | None = 16
    temperature: float = 1.0          # 0 (< 1e-5): greedy
    top_p: float = 1.0
    top_k: int = -1                   # <= 0: off
    repetition_penalty: float = 1.0   # HF style, over prompt + output tokens
    presence_penalty: float = 0.0     # OpenAI style, over output tokens
    frequency_penalty: float = 0.0    # OpenAI style, over output tokens, count-weighted
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None       # top-n raw logprobs per token; None: the chosen token's only
    n: int = 1                        # samples per request
    structured: StructuredOutput | None = None  # a constraint on the output text (JSON schema, regex...)

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or below 1e-5, where logits / T could overflow to inf): argmax."""
        return self.temperature < _GREEDY_BELOW

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first field outside its allowed range."""
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 (or None: the room left under max_seq_len)")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "-1 or 0 (off) or an integer >= 1")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "None or in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"token ids in [0, {vocab_size})")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= MAX_N:
            raise bad("n", f"an integer in [1, {MAX_N}]")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise bad("structured", "None or a StructuredOutput")
            self.structured.validate()


@dataclass
class SampleOutput:
    """One sampled token per row, with its raw logprob and the optional top-n."""

    token_ids: list[int]                                  # [B]
    logprobs: list[float]                                 # [B] raw log-softmax at the chosen token
    top_logprobs: list[list[tuple[int, float]] | None]   # [B] top-n (token, logprob) or None


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index in text where the earliest stop string starts (text is cut there), or None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`, or None (use the global RNG) without one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]]
                    ) -> torch.Tensor:
    """Penalised logits [B, V] float32 (a copy where any row changes; the input otherwise).

    repetition (HF): each token in prompt + output has its logit divided by the penalty when
    positive, multiplied when negative. Then over output tokens with counts c:
    logit -= frequency_penalty * c + presence_penalty * (c > 0).
    """
    copied = False
    for row, p in enumerate(params):
        rep = p.repetition_penalty != 1.0
        pres_freq = (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and len(output_ids[row]) > 0
        if not (rep or pres_freq):
            continue
        if not copied:
            logits, copied = logits.clone(), True
        x = logits[row]
        if rep:
            vocab = x.shape[0]  # ids past the logits' vocabulary cannot be penalised (as HF)
            seen = torch.tensor(sorted(t for t in set(prompt_ids[row]) | set(output_ids[row]) if t < vocab),
                                dtype=torch.long, device=x.device)
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if pres_freq:
            out = torch.tensor(list(output_ids[row]), dtype=torch.long, device=x.device)
            counts = torch.bincount(out, minlength=x.shape[0]).to(x.dtype)
            x -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(x.dtype)
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates of each row of logits [R, V]: (their logits [R, C] in descending order, -inf
    where dropped; their token ids [R, C] int64). A row keeps its top_k best (<= 0: all) and of
    those the smallest run whose probability reaches its top_p (always at least the best).
    C is the largest top_k when every row sets one (a cheap topk), else V (a full sort)."""
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    width = max(ks)
    if width < vocab:
        cand, ids = logits.topk(width, dim=-1)
    else:
        cand, ids = logits.sort(dim=-1, descending=True)
    dev = logits.device
    k = torch.tensor(ks, device=dev)
    p = torch.tensor(top_p, device=dev, dtype=logits.dtype)
    cand = cand.masked_fill(torch.arange(width, device=dev)[None, :] >= k[:, None], float("-inf"))
    probs = cand.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass strictly ahead of each candidate
    drop = (before >= p[:, None]) & (p[:, None] < 1)  # top_p 1: the fp32 cumsum may pass 1
    drop[:, 0] = False
    return cand.masked_fill(drop, float("-inf")), ids


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of probs [..., V], index i with probability probs[..., i] (unnormalised
    is fine): the argmax of probs / E with E ~ Exp(1) i.i.d., the exponential race; several
    times faster than multinomial over a large vocabulary on CPU, and as exact."""
    race = torch.empty_like(probs).exponential_(generator=generator)
    race.clamp_(min=torch.finfo(race.dtype).tiny)  # a drawn 0 would make 0 / 0 = NaN win argmax
    return (probs / race).argmax(dim=-1)


def mask_disallowed(logits: torch.Tensor, token_bitmask: torch.Tensor) -> torch.Tensor:
    """logits [B, V] float32 with -inf where token_bitmask [B, ceil(V / 32)] int32 (bit j of word w:
    token 32 w + j; any device) has a 0 bit; a new tensor where any row changes, the input otherwise.

    Only the rows with a 0 bit (the constrained ones) are copied to the logits' device and unpacked,
    once for the call; that test runs where the mask lives (the CPU: no device sync).
    """
    batch, vocab = logits.shape
    if tuple(token_bitmask.shape) != (batch, (vocab + 31) // 32) or token_bitmask.dtype != torch.int32:
        raise ValueError(f"token_bitmask must be int32 [{batch}, {(vocab + 31) // 32}] for logits [{batch}, {vocab}], "
                         f"got {token_bitmask.dtype} {list(token_bitmask.shape)}")
    rows = (token_bitmask != -1).any(dim=1).nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits
    words = token_bitmask[rows].to(logits.device)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()  # [R, V]
    rows = rows.to(logits.device)
    return logits.index_put((rows,), logits[rows].masked_fill(~allowed, float("-inf")))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
           output_ids: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None],
           token_bitmask: torch.Tensor | None = None) -> SampleOutput:
    """Draw one token per row of logits [B, V] (float32, any device).

    token_bitmask: int32 [B, ceil(V / 32)] (engine.structured's fill_masks; on the CPU or the
    logits' device), bit j of word w allowing token 32 w + j; rows' disallowed tokens get -inf
    before anything else, so greedy and sampled rows alike only pick allowed tokens.
    Greedy rows (temperature 0) take the argmax after penalties. Other rows: penalties,
    / temperature, top-k, top-p, then a draw with the row's generator (the global RNG where it is
    None; those rows are drawn together). Logprobs come from the raw logits (before the mask).
    """
    batch = logits.shape[0]
    if not len(params) == len(prompt_ids) == len(output_ids) == len(generators) == batch:
        raise ValueError(f"batch mismatch: logits has {batch} rows, params {len(params)}, prompt_ids "
                         f"{len(prompt_ids)}, output_ids {len(output_ids)}, generators {len(generators)}")
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    if token_bitmask is not None:
        logits = mask_disallowed(logits, token_bitmask)
    penalised = apply_penalties(logits, params, prompt_ids, output_ids)
    chosen = penalised.argmax(dim=-1)

    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        dev = logits.device
        idx = torch.tensor(rows, device=dev)
        x = penalised[idx] / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        cand_ids = None  # None: x spans the vocabulary; else x [R, C] are these tokens' logits
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            x, cand_ids = _top_k_top_p(x, top_k, top_p)
        probs = x.softmax(dim=-1)
        drawn = torch.empty(len(rows), dtype=torch.long, device=dev)
        shared = [j for j, i in enumerate(rows) if generators[i] is None]
        if shared:
            sel = torch.tensor(shared, device=dev)
            drawn[sel] = _draw(probs[sel], None)
        for j, i in enumerate(rows):
            if generators[i] is not None:
                drawn[j] = _draw(probs[j], generators[i])
        if cand_ids is not None:
            drawn = cand_ids.gather(1, drawn[:, None]).squeeze(1)
        chosen[idx] = drawn

    token_logprobs = raw_logprobs.gather(1, chosen[:, None]).squeeze(1)
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * batch
    n_top = min(max((p.logprobs or 0 for p in params), default=0), raw_logprobs.shape[-1])
    top_vals, top_ids = raw_logprobs.topk(n_top, dim=-1) if n_top else (raw_logprobs[:, :0],) * 2
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for i, p in enumerate(params):
        if p.logprobs is not None:
            n = p.logprobs
            top_logprobs[i] = list(zip(top_ids[i][:n], top_vals[i][:n], strict=True))
    return SampleOutput(chosen.tolist(), token_logprobs.tolist(), top_logprobs)
