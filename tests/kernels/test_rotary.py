"""apply_rope and apply_mrope on the Triton path against float64 math."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from tests.helpers import DEVICE, DTYPES, assert_close, expect_triton_launch, randn, tolerance

HEAD_DIMS = st.sampled_from([64, 80, 128]) | st.integers(1, 40).map(lambda h: 2 * h)
# (q heads, kv heads) of the real models and the vision tower (16).
HEADS = st.sampled_from([(28, 4), (12, 2), (16, 2), (40, 8), (64, 8), (16, 16), (1, 1)])


def rotate64(x, cos, sin):
    first, second = x.double().chunk(2, dim=-1)
    cos, sin = cos.double().to(x.device)[:, None, :], sin.double().to(x.device)[:, None, :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def mrope_cos_sin64(positions, section, head_dim, theta):
    """Written from the definition: frequency i = theta^(-2i/D) at the position of axis s(i)."""
    half = head_dim // 2
    i = torch.arange(half, dtype=torch.float64)
    inv_freq = theta ** (-2 * i / head_dim)
    axis = torch.tensor([0] * section[0] + [1] * section[1] + [2] * section[2])
    angles = positions.double().cpu()[axis, :].T * inv_freq  # [T, half]
    return angles.cos(), angles.sin()


def split_sections(half, data):
    a = data.draw(st.integers(0, half))
    b = data.draw(st.integers(0, half - a))
    return [a, b, half - a - b]


@settings(max_examples=15)
@given(tokens=st.integers(1, 600), heads=HEADS, head_dim=HEAD_DIMS, dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1))
def test_apply_rope(tokens, heads, head_dim, dtype, seed):
    x = randn(tokens, heads[0], head_dim, dtype=dtype, seed=seed)
    angles = randn(tokens, head_dim // 2, dtype=torch.float32, seed=seed + 1, scale=10.0)
    cos, sin = angles.cos(), angles.sin()
    with expect_triton_launch("apply_rope"):
        out = kernels.apply_rope(x, cos, sin)
    assert out.dtype == dtype
    assert_close(out, rotate64(x, cos, sin), dtype)


@settings(max_examples=15)
@given(tokens=st.integers(1, 400), heads=HEADS, head_dim=HEAD_DIMS, dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31 - 1), max_pos=st.sampled_from([8, 4096, 32768]), data=st.data())
def test_apply_mrope(tokens, heads, head_dim, dtype, seed, max_pos, data):
    half = head_dim // 2
    section = [16, 24, 24] if head_dim == 128 and data.draw(st.booleans()) else split_sections(half, data)
    q = randn(tokens, heads[0], head_dim, dtype=dtype, seed=seed)
    k = randn(tokens, heads[1], head_dim, dtype=dtype, seed=seed + 1)
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_pos, (3, tokens), generator=g).to(DEVICE)
    with expect_triton_launch("apply_mrope"):
        q_out, k_out = kernels.apply_mrope(q, k, positions, section, 1e6)
    cos, sin = mrope_cos_sin64(positions, section, head_dim, 1e6)
    # The angle pos * inv_freq is an fp32 product (as in the HF models): its phase error is up to
    # half an fp32 ulp of pos, i.e. max_pos * 2^-24 rad, relative to the output's magnitude.
    scale = 1.0 + max_pos * 2.0**-23 / tolerance(dtype)[0]
    assert_close(q_out, rotate64(q, cos, sin), dtype, scale=scale)
    assert_close(k_out, rotate64(k, cos, sin), dtype, scale=scale)


def test_mrope_text_positions_equal_plain_rope():
    """Equal positions on all three axes give ordinary RoPE, whatever the sections."""
    tokens, head_dim = 33, 128
    q = randn(tokens, 12, head_dim, dtype=torch.float32, seed=1)
    k = randn(tokens, 2, head_dim, dtype=torch.float32, seed=2)
    pos = torch.arange(100, 100 + tokens, device=DEVICE)
    q_out, k_out = kernels.apply_mrope(q, k, pos.expand(3, tokens), [16, 24, 24], 1e6)
    inv_freq = 1e6 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = pos.double().cpu()[:, None] * inv_freq
    assert_close(q_out, rotate64(q, angles.cos(), angles.sin()), torch.float32, scale=4.0)
    assert_close(k_out, rotate64(k, angles.cos(), angles.sin()), torch.float32, scale=4.0)


def test_rotary_non_contiguous_q_k():
    """q and k as strided views of a fused qkv projection, as the model produces them."""
    tokens, hq, hk, d = 17, 12, 2, 128
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=torch.float16, seed=5)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    positions = torch.randint(0, 50, (3, tokens)).to(DEVICE)
    q_out, k_out = kernels.apply_mrope(q, k, positions, [16, 24, 24], 1e6)
    cos, sin = mrope_cos_sin64(positions, [16, 24, 24], d, 1e6)
    assert_close(q_out, rotate64(q, cos, sin), torch.float16)
    assert_close(k_out, rotate64(k, cos, sin), torch.float16)
    x = randn(tokens, 2 * 16, 80, dtype=torch.float32, seed=6)[:, ::2]  # head stride 160
    angles = randn(tokens, 40, dtype=torch.float32, seed=7)
    assert_close(kernels.apply_rope(x, angles.cos(), angles.sin()),
                 rotate64(x, angles.cos(), angles.sin()), torch.float32)


def test_references_match_float64():
    """The PyTorch references (the CPU path under QVL_KERNELS=auto) follow the same definition."""
    q = randn(9, 4, 64, dtype=torch.float32, seed=1)
    k = randn(9, 2, 64, dtype=torch.float32, seed=2)
    positions = torch.randint(0, 300, (3, 9)).to(DEVICE)
    q_ref, k_ref = kernels.apply_mrope.reference(q, k, positions, [8, 12, 12], 1e4)
    cos, sin = mrope_cos_sin64(positions, [8, 12, 12], 64, 1e4)
    assert_close(q_ref, rotate64(q, cos, sin), torch.float32, scale=4.0)
    assert_close(k_ref, rotate64(k, cos, sin), torch.float32, scale=4.0)
