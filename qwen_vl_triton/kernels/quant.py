"""Int8 quantization ops for W8A8 and W8A16 inference (issue 18; not yet wired into the models).

- `quantize_per_token`: dynamic symmetric int8 per row: scale = max|x| / 127, q = round(x / scale)
  (halves away from zero), clamped to [-127, 127]. Rows wider than the target's int8_store_tile go
  in chunks (two passes: the row's max, then the quantized values): bishengir plans ~0.5 KB of
  Ascend's unified buffer a column on this int8 store path, so Ascend works 256 columns at a time.
- `quantize_per_tensor`: static int8 with one scale and offset (msModelSlim's W8A8 input_scale /
  input_offset): q = round(x * (1 / scale) + offset), halves away from zero, clamped to
  [-128, 127]. The same kernel and chunks as quantize_per_token, in one pass (no row max).
- `int8_matmul`: int8 a [M, K] x int8 b [N, K] (weights as F.linear holds them) accumulated in
  int32, plus an optional int32 bias per output column (msModelSlim's quant_bias, which folds its
  activation offset and the float bias), times a per-row scale (dynamic per-token, or one static
  per-tensor scale) and a per-column scale (per-channel weights; msModelSlim's deq_scale), plus an
  optional float bias; out in fp16 / bf16 / fp32.
- `w8a16_matmul`: x [M, K] (fp16 / bf16 / fp32) x int8 w [N, K] dequantized in the kernel (less
  an optional per-column offset: msModelSlim's asymmetric W8A16), times a per-column scale, plus
  an optional bias: the memory-bound decode reads half the bytes of bf16.

The matmuls walk (row tile, column tile) items of a persistent grid on the cube cores / SMs,
K in BLOCK_K steps. On a device `tl.dot` takes int8 operands with int32 accumulation (int8
matmul) or the activation dtype (w8a16); in the interpreter both go as fp32, exact for int8
products while a dot's partial sums stay below 2^24 (K up to 1040 at |q| = 127: the tests' sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.norms import as_rows
from qwen_vl_triton.kernels.target import Target, Work, current_target, rows_per_tile

QMAX = 127.0


# --------------------------------------------------------------------------------------------
# quantize_per_token, quantize_per_tensor
# --------------------------------------------------------------------------------------------


@triton.jit
def _round_to_int8(y, SYMMETRIC: tl.constexpr):
    """round(y), halves away from zero, clamped to [-127, 127] (SYMMETRIC) or [-128, 127] (fp32;
    no libdevice rint on Ascend)."""
    q = tl.where(y >= 0.0, tl.floor(y + 0.5), -tl.floor(0.5 - y))
    q = tl.minimum(tl.maximum(q, -127.0 if SYMMETRIC else -128.0), 127.0)  # literals: jit reads no globals
    return q.to(tl.int8)  # whole numbers in range: the cast is exact


@triton.jit(do_not_specialize=["n_rows"])
def _quantize_kernel(x_ptr, q_ptr, scale_ptr, offset_ptr, n_rows, n_cols, x_stride,
                     STATIC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """Rows of x (strided by x_stride) -> q int8 [n_rows, n_cols] (contiguous).

    STATIC: one scale and offset (fp32 [1] each at scale_ptr / offset_ptr), q = clamp(round(x *
    (1 / scale) + offset), -128, 127): one pass over BLOCK chunks of each row. Else dynamic per
    row, writing scale fp32 [n_rows] (offset_ptr unread): q = clamp(round(x / scale), -127, 127)
    with scale = max|x| / 127; SINGLE: a row fits one BLOCK (one load), else two passes over
    BLOCK chunks (the row's max, then the quantized values)."""
    cols = tl.arange(0, BLOCK)[None, :]
    if STATIC:
        inv = 1.0 / tl.load(scale_ptr)  # the reciprocal once, as vllm-ascend multiplies by it
        offset = tl.load(offset_ptr)
    for tile in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_R), tl.num_programs(0)):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        row_ok = rows < n_rows
        rows = rows.to(tl.int64)
        x_rows = x_ptr + rows * x_stride
        q_rows = q_ptr + rows * n_cols
        if STATIC:
            for start in range(0, n_cols, BLOCK):
                mask = row_ok & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(q_rows + start + cols, _round_to_int8(x * inv + offset, False), mask=mask)
        else:
            if SINGLE:
                mask = row_ok & (cols < n_cols)
                x = tl.load(x_rows + cols, mask=mask, other=0.0).to(tl.float32)
                amax = tl.max(tl.abs(x), axis=1)[:, None]
                scale = tl.where(amax > 0.0, amax / 127.0, 1.0)  # a row of zeros: scale 1, zeros
                tl.store(q_rows + cols, _round_to_int8(x * (1.0 / scale), True), mask=mask)
            else:
                peak = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
                for start in range(0, n_cols, BLOCK):
                    mask = row_ok & (start + cols < n_cols)
                    peak = tl.maximum(peak, tl.abs(tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)))
                amax = tl.max(peak, axis=1)[:, None]
                scale = tl.where(amax > 0.0, amax / 127.0, 1.0)
                inv_row = 1.0 / scale
                for start in range(0, n_cols, BLOCK):
                    mask = row_ok & (start + cols < n_cols)
                    x = tl.load(x_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
                    tl.store(q_rows + start + cols, _round_to_int8(x * inv_row, True), mask=mask)
            tl.store(scale_ptr + rows, scale, mask=row_ok)


def _round_half_away(y: torch.Tensor) -> torch.Tensor:
    """round(y) with halves away from zero, as _round_to_int8 rounds (torch.round goes to even)."""
    return torch.where(y >= 0, torch.floor(y + 0.5), -torch.floor(0.5 - y))


def _int8_output(shape, device: torch.device) -> torch.Tensor:
    """An int8 output. int8 holds no NaN: under the tests' poisoning (`_backend.poison_outputs`) it
    starts as -128, which quantize_per_token never writes and quantize_per_tensor only where the
    clamp does, so a missed element still shows against the tests' float64 expectations."""
    out = torch.empty(shape, dtype=torch.int8, device=device)
    return out.fill_(-128) if _backend.poison_outputs else out


def _launch_quantize(x: torch.Tensor, scale: torch.Tensor | None,
                     offset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, N], scale fp32): x [..., N] quantized per row (scale None: the scales come
    back [rows]) or with the static per-tensor scale and offset (each fp32 [1], returned as is).
    Rows wider than the target's int8_store_tile go in chunks of it."""
    rows = as_rows(x)
    n_rows, n = rows.shape
    q = _int8_output((n_rows, n), x.device)
    static = scale is not None
    if not static:
        scale = _backend.empty_output((n_rows,), torch.float32, x.device)
    if n_rows and n:
        target = current_target(x.device)
        block = min(triton.next_power_of_2(n), target.int8_store_tile)
        block_rows = rows_per_tile(n_rows, block, target)
        grid = (target.grid(triton.cdiv(n_rows, block_rows), Work.ROWS),)
        _quantize_kernel[grid](rows, q, scale, offset if static else scale, n_rows, n, rows.stride(0),
                               STATIC=static, BLOCK_R=block_rows, BLOCK=block, SINGLE=not static and block >= n,
                               num_warps=target.row_warps(block_rows * block))
    return q, scale


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference (fp32 math, the kernel's rounding): (q int8 [..., N], scale fp32 [...])."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = _round_half_away(xf * (1.0 / scale)[..., None]).clamp(-QMAX, QMAX)
    return q.to(torch.int8), scale


@_backend.op(reference=quantize_per_token_reference)
def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: x [..., N] (fp32/fp16/bf16, any leading strides) ->
    (q int8 [..., N] contiguous, scale fp32 [...]) with x ~ q * scale[..., None]."""
    q, scale = _launch_quantize(x, None, None)
    return q.view(*x.shape), scale.view(x.shape[:-1])


def quantize_per_tensor_reference(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """PyTorch reference (fp32 math, the kernel's rounding and reciprocal): q int8 [..., N]."""
    y = x.float() * (1.0 / scale.float().reshape(())) + offset.float().reshape(())
    return _round_half_away(y).clamp(-QMAX - 1, QMAX).to(torch.int8)


@_backend.op(reference=quantize_per_tensor_reference)
def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 as msModelSlim's W8A8 quantizes activations: x [..., N]
    (fp32/fp16/bf16, any leading strides), scale fp32 [1] (> 0; its input_scale) and offset fp32
    [1] (a whole number in [-128, 127]; its input_offset) -> q int8 [..., N] contiguous =
    clamp(round(x * (1 / scale) + offset), -128, 127), halves away from zero. The values of scale
    and offset stay on the device (no host sync), so they are not checked."""
    if scale.numel() != 1 or offset.numel() != 1:
        raise ValueError(f"scale and offset must be [1] each (per tensor), got {list(scale.shape)} "
                         f"and {list(offset.shape)}")
    scale, offset = (t.to(x.device, torch.float32).reshape(1) for t in (scale, offset))
    return _launch_quantize(x, scale, offset)[0].view(*x.shape)


# --------------------------------------------------------------------------------------------
# matmuls
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["m", "n_tiles_n"])
def _scaled_matmul_kernel(a_ptr, b_ptr, out_ptr, row_scale_ptr, col_scale_ptr, col_offset_ptr, int_bias_ptr,
                          bias_ptr, m, n, k, stride_am, stride_bn, stride_om, n_tiles_n,
                          ROW_SCALE: tl.constexpr, W_OFFSET: tl.constexpr, INT_BIAS: tl.constexpr,
                          BIAS: tl.constexpr, INT8_A: tl.constexpr, DOT_DTYPE: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    """out[i, j] = (sum_k a[i, k] * (b[j, k] (- col_offset[j])) (+ int_bias[j])) * row_scale[i]
    * col_scale[j] (+ bias[j]).

    a: int8 (INT8_A) or float [m, k] rows strided by stride_am; b: int8 [n, k] rows strided by
    stride_bn (unit stride along k for both); row_scale fp32 [m] (ROW_SCALE) or [1]; col_scale
    fp32 [n]; col_offset fp32 [n] (W_OFFSET: float a only), subtracted from each weight tile in
    fp32 before its cast to DOT_DTYPE; int_bias int32 [n]; bias [n] any float. Work item = (row
    tile, column tile)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for item in range(tl.program_id(0), tl.cdiv(m, BLOCK_M) * n_tiles_n, tl.num_programs(0)):
        rows = (item // n_tiles_n) * BLOCK_M + offs_m
        cols = (item % n_tiles_n) * BLOCK_N + offs_n
        row_ok = rows < m
        col_ok = cols < n
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
        b_rows = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
        if W_OFFSET:
            w_offset = tl.load(col_offset_ptr + cols, mask=col_ok, other=0.0)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, k, BLOCK_K):
            k_ok = k0 + offs_k < k
            a = tl.load(a_rows + (k0 + offs_k)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
            b = tl.load(b_rows + (k0 + offs_k)[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0)
            if W_OFFSET:  # the weight tile dequantized: int8 - offset in fp32, rounded once to DOT_DTYPE
                b = b.to(tl.float32) - w_offset
            acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), out_dtype=ACC_DTYPE, input_precision="ieee")
        acc = acc.to(tl.float32)
        if INT_BIAS:  # exact in int32 on a device; added before any scaling, as msModelSlim defines it
            acc += tl.load(int_bias_ptr + cols, mask=col_ok, other=0).to(tl.float32)[None, :]
        if ROW_SCALE:
            acc *= tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
        else:
            acc *= tl.load(row_scale_ptr)
        acc *= tl.load(col_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _matmul_tiles(m: int, target: Target) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): 16-row tiles for decode-sized M (tl.dot's minimum), 64 past it;
    64 x 64 columns x K on a device, 16 x 32 in the interpreter (each program costs ms there)."""
    if target.interpret:
        return 16, 16, 32
    return (16 if m <= 16 else 32 if m <= 32 else 64), 64, 64


def _launch_matmul(a: torch.Tensor, b: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                   col_offset: torch.Tensor | None, int_bias: torch.Tensor | None, bias: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a [{m}, {k}] and b {list(b.shape)} do not share K")
    if b.dtype != torch.int8:
        raise ValueError(f"b (the weights) must be int8, got {b.dtype}")
    if col_scale.shape != (n,):
        raise ValueError(f"col_scale must be [{n}] (one per output channel), got {list(col_scale.shape)}")
    if col_offset is not None and col_offset.shape != (n,):
        raise ValueError(f"w_offset must be [{n}] (one per output channel), got {list(col_offset.shape)}")
    out = _backend.empty_output((m, n), out_dtype, a.device)
    if m == 0 or n == 0:
        return out
    a, b = (_backend.last_dim_contiguous(t) for t in (a, b))
    target = current_target(a.device)
    block_m, block_n, block_k = _matmul_tiles(m, target)
    n_tiles_n = triton.cdiv(n, block_n)
    int8_a = a.dtype == torch.int8
    if int8_a:
        dot_dtype, acc_dtype = (tl.float32, tl.float32) if target.interpret else (tl.int8, tl.int32)
    else:
        dot_dtype, acc_dtype = target.dot_dtype(a.dtype), tl.float32
    row_scale = row_scale.to(a.device, torch.float32).contiguous()
    placeholder = col_scale  # never read when the flag is off
    grid = (target.grid(triton.cdiv(m, block_m) * n_tiles_n, Work.ATTENTION),)
    _scaled_matmul_kernel[grid](
        a, b, out, row_scale, col_scale.to(torch.float32).contiguous(),
        col_offset.to(torch.float32).contiguous() if col_offset is not None else placeholder,
        int_bias.contiguous() if int_bias is not None else placeholder,
        bias.contiguous() if bias is not None else placeholder,
        m, n, k, a.stride(0), b.stride(0), out.stride(0), n_tiles_n,
        ROW_SCALE=row_scale.numel() > 1, W_OFFSET=col_offset is not None, INT_BIAS=int_bias is not None,
        BIAS=bias is not None,
        INT8_A=int8_a, DOT_DTYPE=dot_dtype, ACC_DTYPE=acc_dtype,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def int8_matmul_reference(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                          int_bias: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """PyTorch reference: the int32 sum (exact in fp64 here), then the scales and biases in fp32."""
    acc = (a.double() @ b.double().T).float()
    if int_bias is not None:
        acc = acc + int_bias.float()
    out = acc * a_scale.float().reshape(-1, 1) * b_scale.float()
    return (out + bias.float() if bias is not None else out).to(out_dtype)


@_backend.op(reference=int8_matmul_reference)
def int8_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                int_bias: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W8A8 linear: a int8 [M, K], b int8 [N, K] -> out_dtype [M, N] =
    ((a @ b.T) + int_bias) * a_scale[:, None] * b_scale[None, :] + bias.

    a_scale: fp32 [M] (dynamic per token) or [1] (static per tensor); b_scale: fp32 [N] (per
    channel; msModelSlim's deq_scale, with the input scale folded in, and a_scale = [1.0]);
    int_bias: int32 [N] added to the int32 sum (msModelSlim's quant_bias); bias: float [N]."""
    if a.dtype != torch.int8:
        raise ValueError(f"int8_matmul takes int8 activations, got {a.dtype}")
    if a_scale.numel() not in (1, a.shape[0]):
        raise ValueError(f"a_scale must be [1] or [{a.shape[0]}], got {list(a_scale.shape)}")
    return _launch_matmul(a, b, a_scale.reshape(-1), b_scale, None, int_bias, bias, out_dtype)


def w8a16_matmul_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                           bias: torch.Tensor | None = None, w_offset: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference: (x @ (w - w_offset[:, None]).T) in fp32 with the int8 weights as floats,
    times the scales."""
    wf = w.float() if w_offset is None else w.float() - w_offset.float()[:, None]
    out = (x.float() @ wf.T) * w_scale.float()
    return (out + bias.float() if bias is not None else out).to(x.dtype)


@_backend.op(reference=w8a16_matmul_reference)
def w8a16_matmul(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 w_offset: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16 linear: x [M, K] (fp32/fp16/bf16) and int8 w [N, K] with fp32 per-channel w_scale [N]
    and, for msModelSlim's asymmetric W8A16, fp32 per-channel w_offset [N] -> x.dtype [M, N] =
    (x @ ((w - w_offset[:, None]) * w_scale[:, None]).T) + bias, bias [N] (any float).

    The weights are dequantized in the kernel: w - w_offset in fp32, then one rounding to the dot
    dtype (x.dtype on a device; fp32 in the interpreter), the scale applied to the fp32 sum. For
    whole-number offsets in [-128, 127] |w - w_offset| <= 255 is exact in fp16 and bf16; a
    fractional offset is rounded once there, as a weight dequantized to x.dtype would be."""
    if not x.is_floating_point():
        raise ValueError(f"w8a16_matmul takes float activations, got {x.dtype}")
    one = torch.ones(1, dtype=torch.float32, device=x.device)
    return _launch_matmul(x, w, one, w_scale, w_offset, None, bias, x.dtype)
