"""Rotary position embeddings in the rotate-half layout.

  apply_rope:  cos/sin tables [T, D/2] given (the vision tower's 2D rotary).
  apply_mrope: Qwen2-VL's 3D multimodal rotary. Frequency i of D/2 takes its position from axis
               s(i) of positions[3, T] (t for the first mrope_section[0] frequencies, h for the
               next mrope_section[1], w for the rest); angle = position * theta^(-2i/D).
               Text-only positions (equal on all axes) reduce it to ordinary RoPE.

One kernel serves both: each program loops over tiles of tokens, gets their cos/sin (loaded, or
computed from their three positions), and rotates all heads of q (and k) with them, so each
token's cos/sin row is computed once and never written to memory.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.target import Work, current_target, rows_per_tile

# sin/cos of an angle: a reduction to [-pi/4, pi/4] by multiples of pi/2 (pi/2 in three parts,
# fused multiply-adds: exact enough for |x| up to ~1e5, past any context length), then Cephes'
# single-precision polynomials (about 1 ulp). tl.sin/tl.cos lower to libdevice on NVIDIA, whose
# slow path for huge arguments keeps a 28-byte local array that ptxas counts as spill stores
# (sm_80 and sm_90, the MRoPE launches of small head counts); this is plain arithmetic everywhere.
_TWO_OVER_PI = tl.constexpr(0.636619772367581343)
_PIO2_HI = tl.constexpr(1.57079601e00)
_PIO2_MID = tl.constexpr(3.13916473e-07)
_PIO2_LO = tl.constexpr(5.39030253e-15)


@triton.jit
def _sin_cos(x):
    """(sin x, cos x) of an fp32 tensor."""
    j = tl.floor(x * _TWO_OVER_PI + 0.5)  # the nearest quadrant
    r = tl.fma(j, -_PIO2_HI, x)
    r = tl.fma(j, -_PIO2_MID, r)
    r = tl.fma(j, -_PIO2_LO, r)
    s = r * r
    sin_r = r + r * s * (-1.6666654611e-1 + s * (8.3321608736e-3 + s * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * s + s * s * (4.166664568298827e-2 + s * (-1.388731625493765e-3 + s * 2.443315711809948e-5))
    q = j.to(tl.int32) & 3  # quadrant: 0 (sin, cos), 1 (cos, -sin), 2 (-sin, -cos), 3 (-cos, sin)
    sin_x = tl.where((q & 1) == 0, sin_r, cos_r)
    cos_x = tl.where((q & 1) == 0, cos_r, sin_r)
    sin_x = tl.where(q >= 2, -sin_x, sin_x)
    cos_x = tl.where((q == 1) | (q == 2), -cos_x, cos_x)
    return sin_x, cos_x


@triton.jit
def _rotate_tile(src, dst, tokens, token_ok, n_heads, src_stride_t, src_stride_h, cos, sin,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate all heads of a tile of tokens: tokens/token_ok [BLOCK_T, 1, 1], cos/sin
    [BLOCK_T, 1, BLOCK_HALF] fp32. src is strided over tokens and heads; dst is contiguous
    [tokens, n_heads, 2*HALF]."""
    heads = tl.arange(0, BLOCK_H)[None, :, None]
    i = tl.arange(0, BLOCK_HALF)[None, None, :]
    mask = token_ok & (heads < n_heads) & (i < HALF)
    src = src + tokens * src_stride_t + heads * src_stride_h + i
    dst = dst + tokens * (n_heads * 2 * HALF) + heads * (2 * HALF) + i
    first = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    tl.store(dst, (first * cos - second * sin).to(out_ty), mask=mask)
    tl.store(dst + HALF, (second * cos + first * sin).to(out_ty), mask=mask)


# Token and head counts follow the batch and the rank's heads: not specialised, so no new
# compile per size.
@triton.jit(do_not_specialize=["n_tokens", "n_q_heads", "n_k_heads", "pos_stride_axis"])
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr,
    n_tokens, n_q_heads, n_k_heads, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
    cs_stride_t, pos_stride_axis,
    SECTION_T: tl.constexpr, SECTION_TH: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    FROM_POSITIONS: tl.constexpr, HAS_K: tl.constexpr,
):
    """Each loop iteration rotates q (and k) of BLOCK_T tokens with their cos/sin [BLOCK_T, HALF]."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    i_ok = i < HALF
    if FROM_POSITIONS:
        inv_freq = tl.load(inv_freq_ptr + i, mask=i_ok, other=0.0)
    for tile in range(pid, tl.cdiv(n_tokens, BLOCK_T), nprog):
        tokens = tile * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]  # [BLOCK_T, 1]
        token_ok = tokens < n_tokens
        tokens = tokens.to(tl.int64)
        if FROM_POSITIONS:
            p_t = tl.load(pos_ptr + tokens, mask=token_ok, other=0).to(tl.float32)
            p_h = tl.load(pos_ptr + pos_stride_axis + tokens, mask=token_ok, other=0).to(tl.float32)
            p_w = tl.load(pos_ptr + 2 * pos_stride_axis + tokens, mask=token_ok, other=0).to(tl.float32)
            angle = tl.where(i < SECTION_T, p_t, tl.where(i < SECTION_TH, p_h, p_w)) * inv_freq
            sin, cos = _sin_cos(angle)
        else:
            cs_mask = token_ok & i_ok
            cos = tl.load(cos_ptr + tokens * cs_stride_t + i, mask=cs_mask, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + tokens * cs_stride_t + i, mask=cs_mask, other=0.0).to(tl.float32)
        tokens3, token_ok3 = tokens[:, :, None], token_ok[:, :, None]
        cos, sin = cos[:, None, :], sin[:, None, :]
        _rotate_tile(q_ptr, q_out_ptr, tokens3, token_ok3, n_q_heads, q_stride_t, q_stride_h, cos, sin,
                     HALF, BLOCK_HQ, BLOCK_HALF)
        if HAS_K:
            _rotate_tile(k_ptr, k_out_ptr, tokens3, token_ok3, n_k_heads, k_stride_t, k_stride_h, cos, sin,
                         HALF, BLOCK_HK, BLOCK_HALF)


@functools.lru_cache(maxsize=64)
def inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """[head_dim/2] fp32: theta^(-2i/head_dim), computed exactly as the HF models do."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return (1.0 / (theta**exponents)).to(device)


def _launch_rotary(q, k, cos, sin, positions, mrope_section, theta):
    n_tokens, n_q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head dim, got {head_dim}")
    half = head_dim // 2
    q = _backend.last_dim_contiguous(q)
    q_out = _backend.empty_output(q.shape, q.dtype, q.device)
    k_out = None
    if k is not None:
        if k.shape[0] != n_tokens or k.shape[2] != head_dim:
            raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
        k = _backend.last_dim_contiguous(k)
        k_out = _backend.empty_output(k.shape, k.dtype, k.device)
    from_positions = positions is not None
    if from_positions:
        if positions.shape != (3, n_tokens):
            raise ValueError(f"positions must be [3, {n_tokens}], got {tuple(positions.shape)}")
        if len(mrope_section) != 3 or sum(mrope_section) != half:
            raise ValueError(f"mrope_section {list(mrope_section)} must be 3 ints summing to D/2={half}")
        positions = positions.contiguous()
        inv_freq = inverse_frequencies(head_dim, float(theta), q.device)
        section_t, section_th = mrope_section[0], mrope_section[0] + mrope_section[1]
    else:
        if cos.shape != (n_tokens, half) or sin.shape != cos.shape:
            raise ValueError(f"cos/sin must be [{n_tokens}, {half}], "
                             f"got {tuple(cos.shape)}/{tuple(sin.shape)}")
        cos, sin = cos.contiguous(), sin.to(cos.dtype).contiguous()  # one row stride for both
        section_t = section_th = 0
    block_half = triton.next_power_of_2(half)
    n_k_heads = k.shape[1] if k is not None else 0
    block_hq = triton.next_power_of_2(n_q_heads)
    target = current_target(q.device)
    block_t = rows_per_tile(n_tokens, block_hq * block_half, target)
    grid = (target.grid(triton.cdiv(n_tokens, block_t), Work.ROWS),)
    _rotary_kernel[grid](
        q, k if k is not None else q, q_out, k_out if k is not None else q_out,
        cos if cos is not None else q, sin if sin is not None else q,
        positions if from_positions else q, inv_freq if from_positions else q,
        n_tokens, n_q_heads, n_k_heads, q.stride(0), q.stride(1),
        k.stride(0) if k is not None else 0, k.stride(1) if k is not None else 0,
        cos.stride(0) if cos is not None else 0, positions.stride(0) if from_positions else 0,
        SECTION_T=section_t, SECTION_TH=section_th, HALF=half, BLOCK_T=block_t, BLOCK_HALF=block_half,
        BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(max(n_k_heads, 1)),
        FROM_POSITIONS=from_positions, HAS_K=k is not None,
        num_warps=target.row_warps(block_t * block_hq * block_half),
    )
    return q_out, k_out


# ---------------------------------------------------------------- PyTorch references (fp32 math)

def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by cos/sin [T, D/2] (fp32), returned in x's dtype."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, H, D] with cos/sin [T, D/2]."""
    return _rotate_reference(x, cos.float(), sin.float())


@functools.lru_cache(maxsize=16)
def _mrope_axis(mrope_section: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[D/2] int64: the axis (0 t, 1 h, 2 w) whose position frequency i rotates by. Built from the
    section sizes on the host, so no op reads a tensor's values (the decode step has no host sync)."""
    return torch.tensor([axis for axis, n in enumerate(mrope_section) for _ in range(n)], device=device)


def mrope_angles(positions: torch.Tensor, mrope_section, head_dim: int, theta: float) -> torch.Tensor:
    """[T, D/2] fp32 angles: frequency i uses the position of axis s(i) (t, h, w sections)."""
    inv_freq = inverse_frequencies(head_dim, float(theta), positions.device)
    axis = _mrope_axis(tuple(mrope_section), positions.device)
    return positions.float()[axis].T * inv_freq  # [T, D/2]


def apply_mrope_reference(q, k, positions, mrope_section, theta):
    """3D multimodal RoPE of q [T, Hq, D] and k [T, Hk, D] from positions [3, T]."""
    angles = mrope_angles(positions, mrope_section, q.shape[-1], theta)
    cos, sin = angles.cos(), angles.sin()
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


# ---------------------------------------------------------------- public ops

@_backend.op(reference=apply_rope_reference)
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [T, H, D] (strided over T and H allowed), cos/sin [T, D/2]
    -> new [T, H, D] in x.dtype: out[..., :D/2] = x1*cos - x2*sin, out[..., D/2:] = x2*cos + x1*sin."""
    return _launch_rotary(x, None, cos, sin, None, None, None)[0]


@_backend.op(reference=apply_mrope_reference)
def apply_mrope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, mrope_section,
                theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL multimodal RoPE of q [T, Hq, D] and k [T, Hk, D] (one launch for both).

    positions [3, T] integer (t, h, w rows); mrope_section 3 ints summing to D/2; theta the rope
    base. Returns new (q, k) in their dtypes; the inputs are not modified.
    """
    return _launch_rotary(q, k, None, None, positions, mrope_section, theta)
