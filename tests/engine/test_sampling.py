"""The sampler: greedy, raw logprobs, top-k / top-p, seeded draws, the sampled distribution,
penalties (repetition against transformers' processor), token bitmasks (structured outputs),
validate() and find_stop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton.engine.sampling import (
    SamplingParams,
    apply_penalties,
    find_stop,
    make_generator,
    mask_disallowed,
    sample,
)
from qwen_vl_triton.engine.structured import StructuredOutput
from tests.helpers import DEVICE

V = 50


def _logits(batch: int = 4, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


def _run(logits: torch.Tensor, params: list[SamplingParams], gens=None, prompts=None, outputs=None):
    b = logits.shape[0]
    return sample(logits, params, prompts or [[]] * b, outputs or [[]] * b, gens or [None] * b)


def test_greedy_is_argmax_and_logprobs_are_raw():
    logits = _logits(6)
    params = [SamplingParams(temperature=0.0, logprobs=3) for _ in range(6)]
    out = _run(logits, params)
    assert out.token_ids == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits.double().cpu(), -1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
        vals, ids = ref[i].topk(3)
        assert [t for t, _ in out.top_logprobs[i]] == ids.tolist()
        assert [v for _, v in out.top_logprobs[i]] == pytest.approx(vals.tolist(), abs=1e-5)


def test_logprobs_of_sampled_tokens_ignore_transforms():
    logits = _logits(8)
    params = [SamplingParams(temperature=0.3 + 0.2 * i, top_k=5, top_p=0.9, repetition_penalty=1.5,
                             frequency_penalty=0.5) for i in range(8)]
    gens = [make_generator(i, DEVICE) for i in range(8)]
    out = _run(logits, params, gens, prompts=[[1, 2, 3]] * 8, outputs=[[4, 4]] * 8)
    ref = torch.log_softmax(logits.double().cpu(), -1)
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
    assert out.top_logprobs == [None] * 8


def test_logprobs_zero_gives_empty_list():
    out = _run(_logits(2), [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=0)])
    assert out.top_logprobs == [[], None]


@pytest.mark.parametrize("temperature", [0.01, 1.0, 5.0])
def test_top_k_1_and_tiny_top_p_are_greedy(temperature: float):
    logits = _logits(8)
    greedy = logits.argmax(-1).tolist()
    for params in (SamplingParams(temperature=temperature, top_k=1),
                   SamplingParams(temperature=temperature, top_p=1e-6)):
        gens = [make_generator(i, DEVICE) for i in range(8)]
        assert _run(logits, [params] * 8, gens).token_ids == greedy


def test_tiny_temperature_is_greedy_not_nan():
    logits = _logits(4) * 1e4
    out = _run(logits, [SamplingParams(temperature=1e-30)] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_draws_stay_in_top_k():
    k, n = 4, 2000
    logits = _logits(1).expand(n, V).contiguous()
    gen = make_generator(0, DEVICE)
    out = _run(logits, [SamplingParams(temperature=2.0, top_k=k)] * n, [gen] * n)
    allowed = set(logits[0].topk(k).indices.tolist())
    assert set(out.token_ids) <= allowed
    assert len(set(out.token_ids)) == k  # a hot temperature reaches all of them


def test_top_k_per_row_in_mixed_batch():
    """Rows with different top_k (and one with top_k off) share one candidate set of the widest."""
    n, ks = 600, (2, 6, -1)
    logits = _logits(1).expand(n * 3, V).contiguous()
    params = [SamplingParams(temperature=3.0, top_k=k) for k in ks for _ in range(n)]
    gen = make_generator(0, DEVICE)
    out = _run(logits, params, [gen] * (3 * n)).token_ids
    for r, k in enumerate(ks):
        drawn = set(out[r * n:(r + 1) * n])
        if k > 0:
            assert drawn == set(logits[0].topk(k).indices.tolist())
        else:
            assert len(drawn) > 6


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(3000, 4).contiguous().to(DEVICE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = _run(logits, [SamplingParams(top_p=0.79)] * 3000).token_ids
    assert set(out) == {0, 1}  # 0.5 + 0.3 reaches 0.79: token 2 is out
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = _run(logits, [SamplingParams(top_p=0.81)] * 3000).token_ids
    assert set(out) == {0, 1, 2}


def test_seed_reproduces_and_different_seeds_differ():
    logits = _logits(1, seed=3).expand(64, V).contiguous()
    params = [SamplingParams(temperature=1.5)] * 64

    def draws(seed: int) -> list[int]:
        gen = make_generator(seed, logits.device)
        return _run(logits, params, [gen] * 64).token_ids

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert make_generator(None, "cpu") is None


def test_rows_with_own_generators_are_independent_of_batch():
    logits = _logits(3)
    params = [SamplingParams(temperature=1.0)] * 3
    alone = _run(logits[1:2], params[:1], [make_generator(5, DEVICE)]).token_ids[0]
    mixed = _run(logits, params, [None, make_generator(5, DEVICE), None]).token_ids[1]
    assert alone == mixed


def test_empirical_distribution_matches_softmax():
    vocab, n, temp = 8, 40000, 0.7
    logits = torch.linspace(-2, 2, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))]
    batch = logits[None].expand(n, vocab).contiguous().to(DEVICE)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        out = _run(batch, [SamplingParams(temperature=temp)] * n).token_ids
    counts = torch.bincount(torch.tensor(out), minlength=vocab).double()
    expected = torch.softmax(logits.double() / temp, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, chi2  # 7 degrees of freedom: p = 0.001


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = _logits(3)
    prompts, outputs = [[1, 2, 3, 9], [5, 5, 6], [7]], [[9, 10], [], [0, 1, 2, 3]]
    params = [SamplingParams(temperature=0, repetition_penalty=p) for p in (1.3, 2.0, 0.7)]
    ours = apply_penalties(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        ids = torch.tensor([prompts[i] + outputs[i]])
        hf = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids.to(DEVICE), logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], hf)
    assert torch.equal(logits, _logits(3))  # the input is untouched


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]], device=DEVICE)
    params = [SamplingParams(temperature=0, repetition_penalty=1.2)]
    assert _run(logits, params).token_ids == [0]
    assert _run(logits, params, prompts=[[0]]).token_ids == [1]  # 2.0 / 1.2 < 1.9


def test_presence_and_frequency_penalty_formula():
    logits = _logits(1, vocab=10)
    outputs = [[3, 3, 3, 7]]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    got = apply_penalties(logits, params, [[1, 2]], outputs)
    want = logits.clone()
    want[0, 3] -= 0.25 * 3 + 0.5
    want[0, 7] -= 0.25 * 1 + 0.5
    torch.testing.assert_close(got, want)  # prompt tokens 1, 2 are not penalised
    neutral = [SamplingParams()]
    assert apply_penalties(logits, neutral, [[1]], outputs) is logits  # no copy when neutral


def test_penalty_picks_another_greedy_token():
    logits = torch.tensor([[3.0, 2.5, 0.0]], device=DEVICE)
    params = [SamplingParams(temperature=0, frequency_penalty=0.3)]
    assert _run(logits, params, outputs=[[0]]).token_ids == [0]
    assert _run(logits, params, outputs=[[0, 0]]).token_ids == [1]  # 3 - 0.6 < 2.5


def test_mixed_batch_greedy_and_sampled():
    logits = _logits(4)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0, top_k=2)]
    out = _run(logits, params, [None, make_generator(0, DEVICE), None, make_generator(1, DEVICE)])
    greedy = logits.argmax(-1).tolist()
    assert out.token_ids[:3] == greedy[:3]
    assert out.token_ids[3] in logits[3].topk(2).indices.tolist()
    assert all(math.isfinite(x) for x in out.logprobs)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [V]}, "stop_token_ids"), ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 2.0}, "n"),
    ({"n": True}, "n"), ({"structured": "json_object"}, "structured"),
])
def test_validate_names_field(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**kwargs).validate(vocab_size=V)


def test_validate_accepts_edges():
    for kwargs in ({}, {"temperature": 0}, {"top_k": 0}, {"top_k": 1}, {"top_p": 1.0}, {"logprobs": 0},
                   {"logprobs": 20}, {"presence_penalty": -2, "frequency_penalty": 2}, {"stop": ["\n"]},
                   {"stop_token_ids": [V - 1]}, {"n": 1}, {"n": 16},
                   {"structured": StructuredOutput("regex", "[a-z]+")}):
        SamplingParams(**kwargs).validate(vocab_size=V)


def test_validate_checks_the_structured_output():
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        SamplingParams(structured=StructuredOutput("json_schema", "{'type': 'object'}")).validate()


def test_find_stop():
    assert find_stop("hello world", []) is None
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("hello world", ["world", "o"]) == 4  # the earliest match wins
    assert find_stop("a</s>b", ["</s>"]) == 1
    assert find_stop("abc", ["abc"]) == 0


def test_batch_mismatch_raises():
    with pytest.raises(ValueError, match="batch mismatch"):
        sample(_logits(2), [SamplingParams()], [[]], [[]], [None])


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [B, vocab] from an int32 bitmask [B, W] (bit j of word w: token 32 w + j), unpacked by
    numpy's bit order rather than by shifts as the sampler does."""
    as_bytes = bitmask.cpu().numpy().astype("<i4").view(np.uint8)
    return torch.from_numpy(np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :vocab].astype(bool))


def pack_tokens(allowed: torch.Tensor) -> torch.Tensor:
    """int32 [B, ceil(V / 32)] bitmask of bool allowed [B, V]."""
    padded = np.zeros((allowed.shape[0], -(-allowed.shape[1] // 32) * 32), dtype=bool)
    padded[:, :allowed.shape[1]] = allowed.numpy()
    return torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").view("<i4").astype(np.int32))


_row_params = st.builds(
    SamplingParams, temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]), top_k=st.sampled_from([-1, 1, 3, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.3]), repetition_penalty=st.sampled_from([1.0, 1.5]),
    frequency_penalty=st.sampled_from([0.0, 1.0]))


@settings(max_examples=60)
@given(data=st.data(), vocab=st.integers(1, 100), seed=st.integers(0, 2**31 - 1))
def test_bitmask_rows_only_pick_allowed_tokens(data, vocab: int, seed: int):
    """Random masks (some rows unconstrained, some with one allowed token) over random logits: every
    row picks an allowed token, greedy rows the best allowed one, logprobs stay raw, logits untouched."""
    batch = data.draw(st.integers(1, 6))
    params = data.draw(st.lists(_row_params, min_size=batch, max_size=batch))
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(DEVICE)
    allowed = torch.rand(batch, vocab, generator=gen) < torch.rand(batch, 1, generator=gen)
    allowed[torch.arange(batch), torch.randint(vocab, (batch,), generator=gen)] = True  # never empty
    allowed[data.draw(st.lists(st.integers(0, batch - 1), max_size=batch))] = True  # unconstrained rows
    before = logits.clone()
    outputs = [torch.randint(vocab, (3,), generator=gen).tolist() for _ in range(batch)]
    gens = [make_generator(seed + i, DEVICE) for i in range(batch)]
    out = sample(logits, params, [[]] * batch, outputs, gens, token_bitmask=pack_tokens(allowed))
    assert torch.equal(logits, before)
    ref = torch.log_softmax(before.double().cpu(), -1)
    penalised = apply_penalties(logits, params, [[]] * batch, outputs).cpu().masked_fill(~allowed, float("-inf"))
    for i, tok in enumerate(out.token_ids):
        assert allowed[i, tok]
        assert out.logprobs[i] == pytest.approx(ref[i, tok].item(), abs=1e-5)
        if params[i].greedy:
            assert tok == penalised[i].argmax().item()


@settings(max_examples=30)
@given(vocab=st.integers(1, 200), batch=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_pack_and_unpack_agree_with_the_sampler(vocab: int, batch: int, seed: int):
    """The test helpers' bit order is the sampler's: mask_disallowed keeps exactly the allowed logits."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.rand(batch, vocab, generator=gen) < 0.5
    bitmask = pack_tokens(allowed)
    assert bitmask.shape == (batch, -(-vocab // 32)) and bitmask.dtype == torch.int32
    assert torch.equal(allowed_tokens(bitmask, vocab), allowed)
    logits = torch.randn(batch, vocab, generator=gen)
    masked = mask_disallowed(logits, bitmask)
    assert torch.equal(torch.isfinite(masked), allowed)
    assert torch.equal(masked[allowed], logits[allowed])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_with_non_contiguous_logits(dtype: torch.dtype):
    """Logits that are a transposed view (and of another dtype) give what their contiguous float32 copy gives."""
    vocab, batch = 70, 4
    base = torch.randn(vocab, batch, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
    logits = base.t()
    assert not logits.is_contiguous()
    allowed = torch.zeros(batch, vocab, dtype=torch.bool)
    allowed[:, 33:40] = True
    allowed[2] = True
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=2.0, top_k=3)]

    def run(x: torch.Tensor) -> tuple[list[int], list[float]]:
        gens = [make_generator(i, DEVICE) for i in range(batch)]
        out = sample(x, params, [[]] * batch, [[]] * batch, gens, token_bitmask=pack_tokens(allowed))
        return out.token_ids, out.logprobs

    tokens, logprobs = run(logits)
    assert (tokens, logprobs) == run(logits.float().contiguous())
    assert all(allowed[i, t] for i, t in enumerate(tokens))
    assert tokens[0] == 33 + logits[0, 33:40].argmax().item()


def test_all_ones_bitmask_changes_nothing():
    logits = _logits(3, vocab=40)
    bitmask = torch.full((3, 2), -1, dtype=torch.int32)
    assert mask_disallowed(logits, bitmask) is logits
    params = [SamplingParams(temperature=1.0, top_p=0.8)] * 3
    without = _run(logits, params, [make_generator(i, DEVICE) for i in range(3)])
    with_mask = sample(logits, params, [[]] * 3, [[]] * 3, [make_generator(i, DEVICE) for i in range(3)],
                       token_bitmask=bitmask)
    assert with_mask == without


@pytest.mark.parametrize("shape, dtype", [((2, 2), torch.int32), ((3, 1), torch.int32), ((3, 2), torch.int64)])
def test_bitmask_of_wrong_shape_or_dtype_raises(shape: tuple[int, int], dtype: torch.dtype):
    with pytest.raises(ValueError, match="token_bitmask must be int32"):
        sample(_logits(3, vocab=40), [SamplingParams()] * 3, [[]] * 3, [[]] * 3, [None] * 3,
               token_bitmask=torch.full(shape, -1, dtype=dtype))
