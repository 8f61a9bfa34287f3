"""The int8 ops (kernels/quant.py) on the Triton path against float64 math on dequantized values."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qwen_vl_triton.kernels.quant as quant
from qwen_vl_triton.kernels.target import current_target, use_target
from tests.helpers import DEVICE, DTYPES, assert_close, expect_triton_launch, randn


def _int8(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8).to(DEVICE)


def _round_away64(y: torch.Tensor) -> torch.Tensor:
    """round(y) with halves away from zero, in float64."""
    return torch.where(y >= 0, torch.floor(y + 0.5), -torch.floor(0.5 - y))


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
    exact = _round_away64(x64 / expected_scale[:, None])
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


def _per_tensor64(x: torch.Tensor, scale: float, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, q): x / scale + offset in float64 and its int8 value (halves away from 0, clamped to
    [-128, 127]), as msModelSlim's W8A8 defines static activation quantization."""
    y = x.double().cpu() / scale + offset
    return y, _round_away64(y).clamp(-128, 127)


def _assert_per_tensor(q: torch.Tensor, x: torch.Tensor, scale: float, offset: float) -> None:
    """q matches float64 math: exactly, except that fp32 math may land a value within rounding of
    a .5 boundary one step off. Unwritten elements (-128 under the tests' poisoning) fail too."""
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous()
    y, expected = _per_tensor64(x, scale, offset)
    diff = (q.double().cpu() - expected).abs()
    assert diff.max() <= 1
    near_tie = ((y - y.floor()) - 0.5).abs() <= 1e-5 * y.abs().clamp(min=1)
    wrong = (diff > 0) & ~near_tie
    assert not wrong.any(), f"{int(wrong.sum())} values wrong, e.g. q={q.cpu()[wrong][:5].tolist()} " \
                            f"for x / scale + offset = {y[wrong][:5].tolist()}"


@settings(max_examples=14, deadline=None)
@given(rows=st.integers(1, 24), cols=st.sampled_from([1, 7, 64, 1280, 4097, 5000]) | st.integers(2, 300),
       layout=st.sampled_from(["contiguous", "strided", "3d"]), dtype=st.sampled_from(DTYPES),
       scale=st.floats(0.005, 0.2), offset=st.integers(-128, 127), store_tile=st.sampled_from([4096, 256, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_quantize_per_tensor(rows, cols, layout, dtype, scale, offset, store_tile, seed):
    if cols > 4096:
        rows = min(rows, 3)  # the chunked path at the interpreter's own tile (4096), a few rows
    if layout == "strided":  # rows strided by 2 * cols
        x = randn(rows, 2, cols, dtype=dtype, seed=seed, scale=3.0)[:, 1]
    elif layout == "3d":
        x = randn(2, rows, cols, dtype=dtype, seed=seed, scale=3.0)
    else:
        x = randn(rows, cols, dtype=dtype, seed=seed, scale=3.0)
    # |x / scale| reaches hundreds to thousands: both clamps, pushed further by the offset.
    plan = dataclasses.replace(current_target(DEVICE), int8_store_tile=store_tile)  # Ascend's is 256
    s, o = torch.tensor([scale], dtype=torch.float32), torch.tensor([float(offset)], dtype=torch.float32)
    with use_target(plan), expect_triton_launch("quantize_per_tensor"):
        q = quant.quantize_per_tensor(x, s.to(DEVICE), o.to(DEVICE))
    _assert_per_tensor(q, x, float(s), float(offset))


def test_quantize_per_tensor_wide_rows_go_in_chunks():
    one = torch.ones(1, device=DEVICE)
    wide = randn(3, 2, 4099, dtype=torch.bfloat16, seed=2, scale=100.0)[:, 1]  # past the tile of 4096, strided
    with expect_triton_launch("quantize_per_tensor"):
        q = quant.quantize_per_tensor(wide, one, -one)
    _assert_per_tensor(q, wide, 1.0, -1.0)
    x = randn(5, 3, 200, dtype=torch.float16, seed=3, scale=100.0)[:, 1]
    with use_target(dataclasses.replace(current_target(DEVICE), int8_store_tile=64)):  # as Ascend's 256
        q = quant.quantize_per_tensor(x, one * 0.75, one * 7)
    _assert_per_tensor(q, x, 0.75, 7.0)


def test_quantize_per_tensor_clamps_and_rounds_halves_away_from_zero():
    scale, offset = 0.5, -100.0  # 1 / 0.5 is exact: every y below is exact in fp32
    y = torch.tensor([[-1000.0, -28.5, -28.0, -27.5, -27.4, 0.0, 102.5, 97.5, 226.4, 227.0, 227.5, 1000.0]])
    x = (y * scale).to(DEVICE)  # y = x / scale; q = round(y + offset)
    with expect_triton_launch("quantize_per_tensor"):
        q = quant.quantize_per_tensor(x, torch.tensor([scale], device=DEVICE), torch.tensor([offset], device=DEVICE))
    # y + offset: -128.5 and -127.5 round to -129 and -128 (away from zero), both -128: the int8
    # floor a symmetric [-127, 127] clamp would miss; 2.5 / -2.5 go to 3 / -3; 127.5 to 128, then 127.
    expected = [-128, -128, -128, -128, -127, -100, 3, -3, 126, 127, 127, 127]
    assert q.cpu().tolist() == [expected]
    assert quant.quantize_per_tensor.reference(x, torch.tensor([scale]), torch.tensor([offset])).tolist() == [expected]


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
       w_offset=st.sampled_from([None, "whole", "fractional"]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_w8a16_matmul(m, n, k, bias, w_offset, dtype, seed):
    x = randn(m, k, dtype=dtype, seed=seed)
    w = _int8(n, k, seed + 1)
    w_scale = (torch.rand(n, generator=torch.Generator().manual_seed(seed + 2)) / 100 + 1e-4).to(DEVICE)
    fb = randn(n, dtype=dtype, seed=seed + 3) if bias else None
    off = None
    if w_offset is not None:  # msModelSlim's asymmetric W8A16: whole numbers in [-128, 127]; any float too
        off = torch.rand(n, generator=torch.Generator().manual_seed(seed + 4), dtype=torch.float64) * 255 - 128
        off = (off.round() if w_offset == "whole" else off).float().to(DEVICE)
    with expect_triton_launch("w8a16_matmul"):
        out = quant.w8a16_matmul(x, w, w_scale, fb, w_offset=off)
    assert out.shape == (m, n) and out.dtype == dtype
    w64 = w.double() - (off.double()[:, None] if off is not None else 0)  # the dequantized weights, unscaled
    expected = _matmul64(x, w64, torch.ones(1), w_scale, None, fb)
    assert_close(out, expected, dtype, scale=float(max(1, k) ** 0.5))
    assert_close(quant.w8a16_matmul.reference(x, w, w_scale, fb, w_offset=off), expected, dtype,
                 scale=float(max(1, k) ** 0.5))


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
        (lambda: quant.w8a16_matmul(a.float(), _int8(5, 8, 3), torch.ones(5), w_offset=torch.ones(4)), "w_offset"),
        (lambda: quant.quantize_per_tensor(a.float(), torch.ones(2), torch.zeros(1)), "per tensor"),
    ]:
        try:
            call()
        except ValueError as e:
            assert message in str(e)
        else:
            raise AssertionError(f"no error for {message}")
