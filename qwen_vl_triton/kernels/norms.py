"""Row normalisations: rms_norm, add_rms_norm (fused residual add) and layer_norm.

One Triton kernel serves all three (constexpr flags pick mean subtraction, bias, residual).
Each program loops over rows (persistent grid). A row that fits one tile (N <= MAX_TILE) is
loaded once and kept on chip; a wider row is processed in chunks: one pass for the statistics,
one to normalise (and, for layer_norm, one more for the variance around the mean).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.target import Work, current_target, rows_per_tile

# Widest row kept in one tile: 8192 fp32 values = 32 KB live, well inside Ascend's 192 KB
# unified buffer together with the weight and the output tile. Wider rows go in CHUNK pieces.
MAX_TILE = 8192
CHUNK = 4096


# The row count follows the batch: not specialised, so no new compile per size.
@triton.jit(do_not_specialize=["n_rows"])
def _norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr,
    n_rows, n_cols, x_stride, res_stride, eps,
    SUBTRACT_MEAN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
):
    """out[r] = (x[r] (+ res[r]) - mean?) * rstd * w (+ b); sum[r] = x[r] + res[r] when HAS_RESIDUAL.

    Each loop iteration normalises a tile of BLOCK_R rows (several narrow rows per tile keep the
    work per iteration large). x/res rows are strided (x_stride, res_stride); out and sum are
    contiguous [n_rows, n_cols].
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)[None, :]
    for tile in range(pid, tl.cdiv(n_rows, BLOCK_R), nprog):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        row_ok = rows < n_rows
        rows = rows.to(tl.int64)
        x_rows = x_ptr + rows * x_stride
        res_rows = res_ptr + rows * res_stride
        out_rows = out_ptr + rows * n_cols
        sum_rows = sum_ptr + rows * n_cols
        if SINGLE_TILE:
            mask = row_ok & (cols < n_cols)
            x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                x += tl.load(res_rows + cols, mask=mask, other=0.0).to(tl.float32)
                # Round the sum to the storage dtype first: the norm then sees exactly the
                # residual stream the next layer adds to (as the unfused model would).
                x_rounded = x.to(sum_ptr.dtype.element_ty)
                tl.store(sum_rows + cols, x_rounded, mask=mask)
                x = x_rounded.to(tl.float32)
            if SUBTRACT_MEAN:
                x = tl.where(mask, x - (tl.sum(x, axis=1) / n_cols)[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)[:, None]
            y = x * rstd * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            tl.store(out_rows + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            # Pass 1: the sum (write the residual sum on the way), then the centred sum of squares.
            total = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = row_ok & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    x += tl.load(res_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                    x_rounded = x.to(sum_ptr.dtype.element_ty)
                    tl.store(sum_rows + start + cols, x_rounded, mask=mask)
                    x = x_rounded.to(tl.float32)
                total += x if SUBTRACT_MEAN else x * x
            if HAS_RESIDUAL:  # later passes read the rounded sum this program just wrote
                x_rows = sum_rows
            mean = tl.zeros([BLOCK_R, 1], dtype=tl.float32)
            if SUBTRACT_MEAN:
                mean = (tl.sum(total, axis=1) / n_cols)[:, None]
                total = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    mask = row_ok & (start + cols < n_cols)
                    x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                    x = tl.where(mask, x - mean, 0.0)
                    total += x * x
            rstd = tl.math.rsqrt(tl.sum(total, axis=1) / n_cols + eps)[:, None]
            # Last pass: normalise.
            for start in range(0, n_cols, BLOCK):
                col_ok = start + cols < n_cols
                mask = row_ok & col_ok
                x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                y = (x - mean) * rstd * tl.load(w_ptr + start + cols, mask=col_ok, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y += tl.load(b_ptr + start + cols, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(out_rows + start + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x[..., N] as a 2D [rows, N] tensor with unit stride along N (a view when strides allow)."""
    return _backend.last_dim_contiguous(x).reshape(-1, x.shape[-1])


def _launch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 residual: torch.Tensor | None, eps: float, subtract_mean: bool, op: str):
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"norm weight/bias must have shape ({n},), got {tuple(weight.shape)}")
    rows = as_rows(x)
    res_rows = as_rows(residual) if residual is not None else rows
    if res_rows.shape != rows.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    out = _backend.empty_output(x.shape, x.dtype, x.device)
    summed = _backend.empty_output(x.shape, x.dtype, x.device) if residual is not None else out
    single = n <= MAX_TILE
    block = triton.next_power_of_2(n) if single else CHUNK
    n_rows = rows.shape[0]
    target = current_target(x.device)
    plan = target.row_plan(op, n, n_rows)  # the device's plan (kernels/plans.py) or the defaults
    block_rows = rows_per_tile(n_rows, block, target, plan=plan)
    grid = (target.grid(triton.cdiv(n_rows, block_rows), Work.ROWS, plan.programs_per_core),)
    _norm_kernel[grid](
        rows, res_rows, weight.contiguous(), (bias if bias is not None else weight).contiguous(), out, summed,
        n_rows, n, rows.stride(0), res_rows.stride(0), eps,
        SUBTRACT_MEAN=subtract_mean, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_R=block_rows, BLOCK=block, SINGLE_TILE=single, num_warps=target.row_warps(block_rows * block, plan),
    )
    return out, summed


# ---------------------------------------------------------------- PyTorch references (fp32 math)

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, in fp32, returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to x's dtype before the norm."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_reference(summed, weight, eps), summed


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with weight and bias, in fp32, returned in x's dtype."""
    y = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)


# ---------------------------------------------------------------- public ops

@_backend.op(reference=rms_norm_reference)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm. x [..., N] (fp32/fp16/bf16, any leading strides), weight [N] -> [..., N] in x.dtype."""
    return _launch_norm(x, weight, None, None, eps, subtract_mean=False, op="rms_norm")[0]


@_backend.op(reference=add_rms_norm_reference)
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm. x, residual [..., N] -> (normed, summed), both [..., N] in
    x.dtype, where summed = x + residual (the next residual stream) and normed = rms_norm(summed)."""
    return _launch_norm(x, weight, None, residual, eps, subtract_mean=False, op="add_rms_norm")


@_backend.op(reference=layer_norm_reference)
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with bias (Qwen2-VL's vision blocks). x [..., N], weight/bias [N] -> [..., N]."""
    return _launch_norm(x, weight, bias, None, eps, subtract_mean=True, op="layer_norm")[0]
