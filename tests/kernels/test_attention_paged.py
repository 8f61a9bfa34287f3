"""paged_attention (decode) and paged_prefill_attention on the Triton path against float64
attention over the same keys: shuffled block tables, NaN in every cache slot no sequence owns
(and in the table's padding columns' block), GQA configs, head dims 64/80/128, block sizes
16/32/64/128, fp32/fp16/bf16, flash-decoding splits forced and chosen, tile plans drawn."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from qwen_vl_triton.kernels.attention_paged import _paged_decode, decode_splits
from qwen_vl_triton.kernels.target import current_target, use_target
from tests.helpers import DEVICE, DTYPES, assert_close, expect_triton_launch, randn, tile_plans
from tests.kernels.attention_oracle import (
    ATTENTION_SCALE,
    HEAD_CONFIGS,
    HEAD_DIMS,
    attention64,
    build_paged_cache,
    cu_seqlens,
)

BLOCK_SIZES = [16, 32, 64, 128]
CONTEXTS = st.sampled_from([1, 15, 16, 17, 128, 129]) | st.integers(1, 400)


def decode64(q, cache, scale=None):
    """[B, Hq, D] float64: each sequence's one query (its last position) over all its keys."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.stack([attention64(q[b : b + 1], cache.keys[b], cache.values[b], scale)[0]
                        for b in range(q.shape[0])])


def prefill64(q, cache, q_lens, scale=None):
    """[T, Hq, D] float64: sequence b's queries are its last q_lens[b] positions, causal."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, start = [], 0
    for b, n in enumerate(q_lens):
        ctx = cache.keys[b].shape[0]
        out.append(attention64(q[start : start + n], cache.keys[b], cache.values[b], scale, ctx - n))
        start += n
    return torch.cat(out)


@settings(max_examples=14)
@given(ctx_lens=st.lists(CONTEXTS, min_size=1, max_size=4), heads=st.sampled_from(HEAD_CONFIGS),
       d=st.sampled_from(HEAD_DIMS), block_size=st.sampled_from(BLOCK_SIZES), dtype=st.sampled_from(DTYPES),
       splits=st.sampled_from([None, 1, 2, 5]), plan=tile_plans(), seed=st.integers(0, 2**31 - 1))
def test_paged_attention_decode(ctx_lens, heads, d, block_size, dtype, splits, plan, seed):
    """Under a drawn tile plan (key tiles smaller than the cache block included)."""
    hq, hk = heads
    cache = build_paged_cache(ctx_lens, hk, d, block_size, dtype, seed)
    q = randn(len(ctx_lens), hq, d, dtype=dtype, seed=seed + 7, scale=2.0)
    args = (q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens)
    with use_target(plan):
        if splits is None:  # the public op, splits chosen by the launcher
            with expect_triton_launch("paged_attention"):
                out = kernels.paged_attention(*args)
        else:  # the same launch with the split count forced (more splits than blocks included)
            out = _paged_decode(*args, None, splits)
    assert out.dtype == dtype
    assert_close(out, decode64(q, cache), dtype, scale=ATTENTION_SCALE)


def test_paged_attention_decode_long_context_batch1():
    """Batch 1 with a few thousand cached tokens: the launcher splits the context across
    programs (flash-decoding) and the reduce kernel combines the partials."""
    ctx, hq, hk, d, bs = 3000, 7, 1, 128, 128
    assert decode_splits(1, hk, math.ceil(ctx / bs), bs, current_target(DEVICE)) > 1
    cache = build_paged_cache([ctx], hk, d, bs, torch.bfloat16, seed=1)
    q = randn(1, hq, d, dtype=torch.bfloat16, seed=2, scale=3.0)
    with expect_triton_launch("paged_attention"):
        out = kernels.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens,
                                      scale=0.1)
    assert_close(out, decode64(q, cache, scale=0.1), torch.bfloat16, scale=ATTENTION_SCALE)


def test_paged_attention_decode_real_config():
    """Qwen2.5-VL-7B decode heads (28 query / 4 kv, D=128), a batch of mixed contexts, block 16."""
    ctx_lens = [1, 33, 250]
    cache = build_paged_cache(ctx_lens, 4, 128, 16, torch.float16, seed=4)
    q = randn(3, 28, 128, dtype=torch.float16, seed=5)
    with expect_triton_launch("paged_attention"):
        out = kernels.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens)
    assert_close(out, decode64(q, cache), torch.float16, scale=ATTENTION_SCALE)


@st.composite
def prefill_batches(draw):
    """Per sequence (context length, new query tokens): fresh prompts (q_len == ctx), cached
    prefixes / chunked prefill (q_len < ctx), and single-token steps."""
    n = draw(st.integers(1, 3))
    ctx = draw(st.lists(CONTEXTS, min_size=n, max_size=n))
    # Fresh prompts only up to 200 tokens: a query tile's cost grows with its whole context.
    q_lens = [draw(st.sampled_from([1, min(c, 200)]) | st.integers(1, min(c, 100))) for c in ctx]
    return ctx, q_lens


@settings(max_examples=12)
@given(batch=prefill_batches(), heads=st.sampled_from(HEAD_CONFIGS), d=st.sampled_from(HEAD_DIMS),
       block_size=st.sampled_from(BLOCK_SIZES), dtype=st.sampled_from(DTYPES), plan=tile_plans(),
       seed=st.integers(0, 2**31 - 1))
def test_paged_prefill_attention(batch, heads, d, block_size, dtype, plan, seed):
    """Under a drawn tile plan (query and key tiles of every size a target may pick)."""
    ctx_lens, q_lens = batch
    hq, hk = heads
    cache = build_paged_cache(ctx_lens, hk, d, block_size, dtype, seed)
    q = randn(sum(q_lens), hq, d, dtype=dtype, seed=seed + 7, scale=2.0)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32).to(DEVICE)
    with use_target(plan), expect_triton_launch("paged_prefill_attention"):
        out = kernels.paged_prefill_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cu_q,
                                              cache.context_lens)
    assert out.dtype == dtype
    assert_close(out, prefill64(q, cache, q_lens), dtype, scale=ATTENTION_SCALE)


def test_paged_prefill_real_config_prefix_hit():
    """28/4 heads x 128, block 128: one sequence whose first 230 tokens were cached (prefix hit)
    adds 30, beside a fresh 20-token prompt."""
    ctx_lens, q_lens = [260, 20], [30, 20]
    cache = build_paged_cache(ctx_lens, 4, 128, 128, torch.bfloat16, seed=9)
    q = randn(sum(q_lens), 28, 128, dtype=torch.bfloat16, seed=10)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32).to(DEVICE)
    with expect_triton_launch("paged_prefill_attention"):
        out = kernels.paged_prefill_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cu_q,
                                              cache.context_lens)
    assert_close(out, prefill64(q, cache, q_lens), torch.bfloat16, scale=ATTENTION_SCALE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_references_match_float64(dtype):
    """The PyTorch references are the CPU path under QVL_KERNELS=auto: check them too."""
    ctx_lens, q_lens, hq, hk, d = [5, 140, 33], [5, 20, 1], 12, 2, 80
    cache = build_paged_cache(ctx_lens, hk, d, 32, dtype, seed=3)
    q = randn(3, hq, d, dtype=dtype, seed=4)
    out = kernels.paged_attention.reference(q, cache.k_cache, cache.v_cache, cache.block_tables,
                                            cache.context_lens)
    assert_close(out, decode64(q, cache), dtype, scale=ATTENTION_SCALE)
    qp = randn(sum(q_lens), hq, d, dtype=dtype, seed=5)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32).to(DEVICE)
    out = kernels.paged_prefill_attention.reference(qp, cache.k_cache, cache.v_cache, cache.block_tables,
                                                    cu_q, cache.context_lens)
    assert_close(out, prefill64(qp, cache, q_lens), dtype, scale=ATTENTION_SCALE)


@pytest.mark.parametrize("d", [40, 96])
def test_paged_head_dims_that_run_as_two_column_tiles(d):
    """Decode (split and not) and prefill at head dims whose tiles are 32 + 16 and 64 + 32."""
    cache = build_paged_cache([300, 17], 2, d, 32, torch.float16, seed=d)
    q = randn(2, 6, d, dtype=torch.float16, seed=d + 1, scale=2.0)
    args = (q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens)
    for splits in (1, 3):
        assert_close(_paged_decode(*args, None, splits), decode64(q, cache), torch.float16, scale=ATTENTION_SCALE)
    q_lens = [12, 17]
    qp = randn(sum(q_lens), 6, d, dtype=torch.float16, seed=d + 2)
    with expect_triton_launch("paged_prefill_attention"):
        out = kernels.paged_prefill_attention(qp, cache.k_cache, cache.v_cache, cache.block_tables,
                                              cu_seqlens(q_lens), cache.context_lens)
    assert_close(out, prefill64(qp, cache, q_lens), torch.float16, scale=ATTENTION_SCALE)
