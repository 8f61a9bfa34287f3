"""rms_norm, add_rms_norm and layer_norm on the Triton path against float64 math."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from tests.helpers import DEVICE, DTYPES, assert_close, expect_triton_launch, randn

EPS = 1e-6
# Real hidden sizes (vision 1280, LLM 1536..8192, Qwen2.5-VL vision MLP 3420), odd widths, and
# rows wider than one on-chip tile (> 8192: the chunked path).
WIDTHS = st.sampled_from([1280, 1536, 3420, 3584, 8192]) | st.integers(1, 300) | st.integers(8193, 12000)
# Up to 1200 rows: several tiles and programs per loop in the interpreter, which takes ~1 s a million
# elements (3000 rows of 12000 made single examples of 30 s).
ROWS = st.sampled_from([1, 2, 7]) | st.integers(1, 1200)


def rms_norm64(x, w):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def layer_norm64(x, w, b):
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + EPS) * w.double() + b.double()


def cases(rows, width):
    """Fewer rows for wide widths: the interpreter's cost grows with rows x chunks."""
    return (min(rows, 48), width) if width > 8192 else (rows, width)


@settings(max_examples=15)
@given(rows=ROWS, width=WIDTHS, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_rms_norm(rows, width, dtype, seed):
    rows, width = cases(rows, width)
    x = randn(rows, width, dtype=dtype, seed=seed, scale=3.0)
    w = randn(width, dtype=dtype, seed=seed + 1)
    with expect_triton_launch("rms_norm"):
        out = kernels.rms_norm(x, w, EPS)
    assert out.dtype == dtype
    assert_close(out, rms_norm64(x, w), dtype)


@settings(max_examples=15)
@given(rows=ROWS, width=WIDTHS, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_add_rms_norm(rows, width, dtype, seed):
    rows, width = cases(rows, width)
    x = randn(rows, width, dtype=dtype, seed=seed)
    residual = randn(rows, width, dtype=dtype, seed=seed + 1, scale=4.0)
    w = randn(width, dtype=dtype, seed=seed + 2)
    with expect_triton_launch("add_rms_norm"):
        normed, summed = kernels.add_rms_norm(x, residual, w, EPS)
    summed64 = x.double() + residual.double()
    assert_close(summed, summed64, dtype)
    # The norm sees the sum rounded to the storage dtype (as the unfused model would).
    assert_close(normed, rms_norm64(summed, w), dtype, scale=2.0)
    assert_close(normed, rms_norm64(summed64, w), dtype, scale=4.0)


@settings(max_examples=15)
@given(rows=ROWS, width=WIDTHS, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1),
       offset=st.floats(-50, 50))
def test_layer_norm(rows, width, dtype, seed, offset):
    rows, width = cases(rows, width)
    # A large common offset checks that the variance is taken around the mean, not from E[x^2].
    x = (randn(rows, width, dtype=torch.float64, seed=seed) + offset).to(dtype)
    w = randn(width, dtype=dtype, seed=seed + 1)
    b = randn(width, dtype=dtype, seed=seed + 2)
    with expect_triton_launch("layer_norm"):
        out = kernels.layer_norm(x, w, b, EPS)
    assert_close(out, layer_norm64(x, w, b), dtype, scale=2.0 if dtype == torch.float32 else 1.0)


def test_norms_non_contiguous_rows():
    """Strided leading dims (a column slice and a transposed 3D view) are read in place."""
    base = randn(64, 2 * 1280, dtype=torch.float16, seed=3)
    x = base[:, 1280:]  # row stride 2560
    w, b = randn(1280, dtype=torch.float16, seed=4), randn(1280, dtype=torch.float16, seed=5)
    assert not x.is_contiguous()
    assert_close(kernels.rms_norm(x, w, EPS), rms_norm64(x, w), torch.float16)
    assert_close(kernels.layer_norm(x, w, b, EPS), layer_norm64(x, w, b), torch.float16)
    r = randn(8, 1280, 8, dtype=torch.float32, seed=6).transpose(1, 2)  # [8, 8, 1280], last stride 8
    res = randn(8, 8, 1280, dtype=torch.float32, seed=7)[:, ::1]
    normed, summed = kernels.add_rms_norm(r, res, randn(1280, dtype=torch.float32, seed=8), EPS)
    assert summed.shape == (8, 8, 1280)
    assert_close(summed, r.double() + res.double(), torch.float32)


def test_norm_rejects_wrong_weight():
    x = randn(4, 64, dtype=torch.float32, seed=0)
    try:
        kernels.rms_norm(x, torch.ones(63, device=DEVICE), EPS)
    except ValueError as e:
        assert "(64,)" in str(e)
    else:
        raise AssertionError("a weight of the wrong width must be refused")
