"""The int8 ops (kernels/quant.py) on the Triton path against float64 math on dequantized values."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels.quant as quant
from kernels.target import current_target, use_target
from tests.helpers import DEVICE, DTYPES, assert_close, expect_triton_launch, randn


def _int8(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8).to(DEVICE)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 40), cols=st.sampled_from([1, 7, 64, 1280]) | st.integers(2, 300),
       dtype=st.sampled_from(DTYPES), zero_row=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_quantize_per_token(rows, cols, dtype, zero_row, seed):
    x = randn(rows, cols, dtype=dtype, seed=seed, scale=3.0)
    if zero_row:
        x[rows // 2] = 0
    with expect_triton_launch("quantize_per_token"):
        q, scale = quant.quantize_per_token(x)
    assert q.dtype == torch.int8 and q.shape == x.shape and scale.shape == (rows,)
    x64 = x.double()
    amax = x64.abs().amax(-1)
    expected_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    q64 = x64 / expected_scale[:, None]
    exact = torch.where(q64 >= 0, torch.floor(q64 + 0.5), -torch.floor(0.5 - q64))
    # fp32 math may land a value just across a .5 boundary: at most one step off, and the
    # dequantized value stays within half a step (plus that rounding) of x.
    assert (q.double() - exact).abs().max() <= 1
    assert (q.double() * expected_scale[:, None] - x64).abs().max() <= (0.5 + 1e-3) * expected_scale.max()
    assert q.abs().max() <= 127
    if zero_row:  # scale 1 and zeros, never a division by zero
        assert (q[rows // 2] == 0).all() and scale[rows // 2] == 1


def test_quantize_per_token_wide_rows_go_in_chunks():
    x = randn(5, 3, 200, dtype=torch.float32, seed=1)[:, 1]  # strided rows
    narrow = dataclasses.replace(current_target(DEVICE), int8_store_tile=64)  # as Ascend's 256 for 1000-wide rows
    with use_target(narrow):
        q, scale = quant.quantize_per_token(x)  # the two-pass path at a size the interpreter runs fast
    expected_q, expected_scale = quant.quantize_per_token_reference(x)
    torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    assert (q.int() - expected_q.int()).abs().max() <= 1


def _matmul64(a, b, row_scale, col_scale, int_bias=None, bias=None):
    acc = a.double() @ b.double().T
    if int_bias is not None:
        acc = acc + int_bias.double()
    out = acc * row_scale.double().reshape(-1, 1) * col_scale.double()
    return out + bias.double() if bias is not None else out


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 200), per_token=st.booleans(),
       int_bias=st.booleans(), bias=st.booleans(), out_dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_int8_matmul(m, n, k, per_token, int_bias, bias, out_dtype, seed):
    a, b = _int8(m, k, seed), _int8(n, k, seed + 1)
    a_scale = (torch.rand(m if per_token else 1, generator=torch.Generator().manual_seed(seed)) + 0.01).to(DEVICE)
    b_scale = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 2)) / 100 + 1e-4).to(DEVICE)
    ib = _int8(1, n, seed + 3).int().reshape(n) * 1000 if int_bias else None
    fb = randn(n, dtype=out_dtype, seed=seed + 4) if bias else None
    with expect_triton_launch("int8_matmul"):
        out = quant.int8_matmul(a, b, a_scale, b_scale, ib, fb, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    assert_close(out, _matmul64(a, b, a_scale, b_scale, ib, fb), out_dtype)


@settings(max_examples=10, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 200), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_w8a16_matmul(m, n, k, bias, dtype, seed):
    x = randn(m, k, dtype=dtype, seed=seed)
    w = _int8(n, k, seed + 1)
    w_scale = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 2)) / 100 + 1e-4).to(DEVICE)
    fb = randn(n, dtype=dtype, seed=seed + 3) if bias else None
    with expect_triton_launch("w8a16_matmul"):
        out = quant.w8a16_matmul(x, w, w_scale, fb)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, _matmul64(x, w, torch.ones(1), w_scale, None, fb), dtype, scale=float(max(1, k) ** 0.5))


def test_matmul_outputs_are_all_written():
    """Every output element is written (outputs start as NaN under the tests' poisoning), at a
    size whose last row and column tiles are partial."""
    a, b = _int8(17, 33, 1), _int8(19, 33, 2)
    out = quant.int8_matmul(a, b, torch.ones(17, device=DEVICE), torch.ones(19, device=DEVICE),
                            out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), a.double() @ b.double().T, rtol=0, atol=0)


def test_bad_shapes_are_named():
    a, b = _int8(4, 8, 1), _int8(5, 9, 2)
    for call, message in [
        (lambda: quant.int8_matmul(a, b, torch.ones(4), torch.ones(5)), "do not share K"),
        (lambda: quant.int8_matmul(a, _int8(5, 8, 3), torch.ones(3), torch.ones(5)), "a_scale"),
        (lambda: quant.int8_matmul(a, _int8(5, 8, 3), torch.ones(4), torch.ones(4)), "col_scale"),
        (lambda: quant.w8a16_matmul(a, _int8(5, 8, 3), torch.ones(5)), "float activations"),
        (lambda: quant.w8a16_matmul(a.float(), _int8(5, 8, 3).float(), torch.ones(5)), "must be int8"),
    ]:
        try:
            call()
        except ValueError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"no error for {message}")
