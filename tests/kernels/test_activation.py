"""silu_and_mul on the Triton path against float64 math."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from tests.helpers import DTYPES, assert_close, expect_triton_launch, randn


def silu_and_mul64(x):
    gate, up = x.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@settings(max_examples=15)
@given(rows=st.sampled_from([1, 3]) | st.integers(1, 2000),
       width=st.sampled_from([3420, 8960, 18944]) | st.integers(1, 700),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_silu_and_mul(rows, width, dtype, seed):
    rows = min(rows, 64) if width > 4000 else rows  # keep the interpreter's chunk count small
    x = randn(rows, 2 * width, dtype=dtype, seed=seed, scale=3.0)
    with expect_triton_launch("silu_and_mul"):
        out = kernels.silu_and_mul(x)
    assert out.shape == (rows, width) and out.dtype == dtype
    assert_close(out, silu_and_mul64(x), dtype)


def test_silu_and_mul_non_contiguous_and_3d():
    x = randn(5, 3, 2 * 3420 + 10, dtype=torch.bfloat16, seed=1)[..., 10:]  # strided rows, 3D
    assert not x.is_contiguous()
    out = kernels.silu_and_mul(x)
    assert out.shape == (5, 3, 3420)
    assert_close(out, silu_and_mul64(x), torch.bfloat16)
