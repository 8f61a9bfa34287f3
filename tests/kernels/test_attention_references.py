"""The attention ops' PyTorch references (the CPU path under QVL_KERNELS=auto) against float64
attention computed one sequence at a time: GQA groups 1/2/4/7, odd and single-token lengths,
repeated lengths (the varlen reference batches equal-length sequences), contexts on cache-block
boundaries, and the references' batch sizes forced small so that their chunk loops run."""

import math
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from qwen_vl_triton.kernels import attention_paged, attention_varlen
from tests.helpers import assert_close, randn
from tests.kernels.attention_oracle import ATTENTION_SCALE, attention64, build_paged_cache, cu_seqlens, varlen64

GROUPS = st.sampled_from([1, 2, 4, 7])
KV_HEADS = st.sampled_from([1, 2])
HEAD_DIMS = st.sampled_from([16, 64, 80])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
# Lengths drawn mostly from a few values (equal lengths share an SDPA call), 0 = an empty sequence.
SEQ_LENS = st.sampled_from([0, 1, 2, 7, 16, 63, 64]) | st.integers(1, 150)


@settings(max_examples=40)
@given(lens=st.lists(SEQ_LENS, min_size=1, max_size=12).filter(sum), group=GROUPS, hk=KV_HEADS, d=HEAD_DIMS,
       dtype=DTYPES, causal=st.booleans(), group_tokens=st.sampled_from([1, 64, 200, 1024]),
       seed=st.integers(0, 2**31 - 1))
def test_varlen_reference(lens, group, hk, d, dtype, causal, group_tokens, seed):
    """group_tokens: the reference's tokens per SDPA call (1 = one sequence per call)."""
    t, hq = sum(lens), group * hk
    q, k, v = (randn(t, h, d, dtype=dtype, seed=seed + i) for i, h in enumerate((hq, hk, hk)))
    with mock.patch.object(attention_varlen, "REFERENCE_GROUP_TOKENS", group_tokens):
        out = kernels.varlen_attention.reference(q, k, v, cu_seqlens(lens), max(lens), causal, scale=0.3)
    assert out.dtype == dtype
    assert_close(out, varlen64(q, k, v, lens, causal, scale=0.3), dtype, scale=ATTENTION_SCALE)


def _paged_case(data, block_size: int, n_seq_max: int):
    """Context lengths on and around block boundaries, or anywhere up to 8 blocks."""
    boundary = st.sampled_from([1, block_size - 1, block_size, block_size + 1, 2 * block_size, 3 * block_size + 1])
    return data.draw(st.lists(boundary | st.integers(1, 8 * block_size), min_size=1, max_size=n_seq_max))


@settings(max_examples=40)
@given(data=st.data(), group=GROUPS, hk=KV_HEADS, d=HEAD_DIMS, block_size=st.sampled_from([16, 32]),
       dtype=DTYPES, decode_elems=st.sampled_from([1, 5000, 1 << 20]), seed=st.integers(0, 2**31 - 1))
def test_paged_decode_reference(data, group, hk, d, block_size, dtype, decode_elems, seed):
    """NaN in every cache slot no sequence owns (and in the table's padding columns' block);
    decode_elems: the reference's gathered elements per SDPA call (1 = one sequence per call)."""
    ctx_lens = _paged_case(data, block_size, 9)
    cache = build_paged_cache(ctx_lens, hk, d, block_size, dtype, seed, extra_columns=data.draw(st.integers(0, 3)))
    q = randn(len(ctx_lens), group * hk, d, dtype=dtype, seed=seed + 1, scale=2.0)
    with mock.patch.object(attention_paged, "REFERENCE_DECODE_ELEMS", decode_elems):
        out = kernels.paged_attention.reference(q, cache.k_cache, cache.v_cache, cache.block_tables,
                                                cache.context_lens)
    expected = torch.stack([attention64(q[b : b + 1], cache.keys[b], cache.values[b], 1 / math.sqrt(d))[0]
                            for b in range(len(ctx_lens))])
    assert out.dtype == dtype
    assert_close(out, expected, dtype, scale=ATTENTION_SCALE)


@settings(max_examples=25)
@given(data=st.data(), group=GROUPS, hk=KV_HEADS, d=HEAD_DIMS, block_size=st.sampled_from([16, 32]),
       dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_paged_prefill_reference(data, group, hk, d, block_size, dtype, seed):
    """Each sequence's queries are its last q_len cached tokens (q_len = its whole context too)."""
    ctx_lens = _paged_case(data, block_size, 5)
    q_lens = [data.draw(st.sampled_from([1, n]) | st.integers(1, n)) for n in ctx_lens]
    cache = build_paged_cache(ctx_lens, hk, d, block_size, dtype, seed)
    q = randn(sum(q_lens), group * hk, d, dtype=dtype, seed=seed + 1, scale=2.0)
    out = kernels.paged_prefill_attention.reference(q, cache.k_cache, cache.v_cache, cache.block_tables,
                                                    cu_seqlens(q_lens), cache.context_lens, scale=0.2)
    expected, start = [], 0
    for b, n in enumerate(q_lens):
        expected.append(attention64(q[start : start + n], cache.keys[b], cache.values[b], 0.2, ctx_lens[b] - n))
        start += n
    assert out.dtype == dtype
    assert_close(out, torch.cat(expected), dtype, scale=ATTENTION_SCALE)
