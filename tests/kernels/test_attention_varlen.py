"""varlen_attention on the Triton path against float64 attention: packed sequence mixes,
causal and bidirectional, GQA head configs, head dims 64/80/128, fp32/fp16/bf16."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from qwen_vl_triton.kernels.target import current_target, use_target
from tests.helpers import DEVICE, DTYPES, assert_close, expect_triton_launch, randn, tile_plans
from tests.kernels.attention_oracle import ATTENTION_SCALE, HEAD_CONFIGS, HEAD_DIMS, cu_seqlens, varlen64

# Sequence mixes: single tokens, odd lengths, lengths around the 64-row tile, a few hundred.
LENGTHS = st.lists(st.sampled_from([1, 2, 63, 64, 65]) | st.integers(1, 160), min_size=1, max_size=3)


def run_varlen(lens, hq, hk, d, dtype, causal, seed, q_scale=1.0, scale=None, plan=None):
    t = sum(lens)
    q = randn(t, hq, d, dtype=dtype, seed=seed, scale=q_scale)
    k = randn(t, hk, d, dtype=dtype, seed=seed + 1)
    v = randn(t, hk, d, dtype=dtype, seed=seed + 2)
    with use_target(plan or current_target(DEVICE)), expect_triton_launch("varlen_attention"):
        out = kernels.varlen_attention(q, k, v, cu_seqlens(lens), max(lens), causal=causal, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, varlen64(q, k, v, lens, causal, scale), dtype, scale=ATTENTION_SCALE)


@settings(max_examples=12)
@given(lens=LENGTHS, heads=st.sampled_from(HEAD_CONFIGS), d=st.sampled_from(HEAD_DIMS),
       dtype=st.sampled_from(DTYPES), causal=st.booleans(), q_scale=st.sampled_from([0.5, 3.0]),
       plan=tile_plans(), seed=st.integers(0, 2**31 - 1))
def test_varlen_attention(lens, heads, d, dtype, causal, q_scale, plan, seed):
    """Under a drawn tile plan; q_scale 3 makes the softmax peaked (large running-max
    corrections across key tiles)."""
    run_varlen(lens, *heads, d, dtype, causal, seed, q_scale, plan=plan)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_long_sequence(causal):
    """A few thousand tokens (many key tiles per query tile) with one head to stay cheap."""
    run_varlen([1200, 37], 1, 1, 64, torch.float32, causal, seed=11, q_scale=2.0)


def test_vit_window_attention_real_shape():
    """Qwen2.5-VL ViT window attention: 16 heads x 80, windows of up to 64 patches (edge windows
    smaller), bidirectional, in bf16 with the scale passed explicitly."""
    lens = [64, 48, 16, 8]
    run_varlen(lens, 16, 16, 80, torch.bfloat16, False, seed=5, scale=1.0 / math.sqrt(80))


def test_varlen_attention_strided_qkv():
    """q/k/v as head-strided views of one fused QKV projection output [T, (Hq + 2Hk) * D]."""
    lens, hq, hk, d = [7, 70], 4, 2, 64
    t = sum(lens)
    qkv = randn(t, (hq + 2 * hk) * d, dtype=torch.float16, seed=3)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    assert not q.is_contiguous()
    with expect_triton_launch("varlen_attention"):
        out = kernels.varlen_attention(q, k, v, cu_seqlens(lens), max(lens), causal=True)
    assert_close(out, varlen64(q, k, v, lens, True), torch.float16, scale=ATTENTION_SCALE)


@settings(max_examples=10)
@given(lens=LENGTHS, heads=st.sampled_from(HEAD_CONFIGS), d=st.sampled_from(HEAD_DIMS),
       dtype=st.sampled_from(DTYPES), causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_varlen_reference_matches_float64(lens, heads, d, dtype, causal, seed):
    """The PyTorch reference is the CPU path under QVL_KERNELS=auto: check it too."""
    hq, hk = heads
    t = sum(lens)
    q, k, v = (randn(t, h, d, dtype=dtype, seed=seed + i) for i, h in enumerate((hq, hk, hk)))
    out = kernels.varlen_attention.reference(q, k, v, cu_seqlens(lens), max(lens), causal)
    assert out.dtype == dtype
    assert_close(out, varlen64(q, k, v, lens, causal), dtype, scale=ATTENTION_SCALE)


def test_varlen_attention_on_device_for_auto_backend(monkeypatch):
    """Under QVL_KERNELS=auto a CPU tensor takes the reference; a device tensor the kernel."""
    monkeypatch.setenv("QVL_KERNELS", "auto")
    q = randn(5, 2, 64, dtype=torch.float32, seed=0)
    with expect_triton_launch("varlen_attention", times=0 if DEVICE.type == "cpu" else 1):
        kernels.varlen_attention(q, q, q, cu_seqlens([5]), 5)


@pytest.mark.parametrize("d", [24, 40, 96, 160])
def test_head_dims_that_run_as_two_column_tiles(d):
    """Head dims that are not a power of two: one padded tile (24) or two column tiles whose dots
    add up (40 = 32 + 16, 96 = 64 + 32, 160 = 128 + 32), causal and not, GQA."""
    for causal in (False, True):
        run_varlen([70, 9], 4, 2, d, torch.float16, causal, seed=d, q_scale=2.0)
