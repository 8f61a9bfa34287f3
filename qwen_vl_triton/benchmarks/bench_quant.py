"""Int8 linear layers (kernels/quant.py) against PyTorch, beside the float GEMM they replace.

Per linear layer of the LLM (qkv with its bias, o, gate_up, down: column-parallel qkv / gate_up
and row-parallel o / down shards, as benchmarks/compile_check/launches.py plans them) of
Qwen2.5-VL-7B (TP 1) and Qwen2.5-VL-72B (TP 1, and one rank's shard at TP 4 and 8), bf16
activations, at decode M = 1 / 4 / 16 / 64 rows and a prefill chunk of M = 2048:
- `torch F.linear`: the float GEMM with the dequantized weights in bf16: the baseline of every
  other row's speedup_vs_baseline;
- int8_matmul (W8A8: int8 activations with per-token scales, int8 weights with per-channel
  scales) against `torch _int_mm + scales` (int8 x int8 -> int32, then the scales and the bias
  in fp32); the activations come already quantized (quantize_per_token has its own rows);
- w8a16_matmul (bf16 activations, int8 weights dequantized in the kernel) against
  `torch dequant + F.linear` (w.to(bf16) * scale, then F.linear);
- quantize_per_token of each layer's input [M, K] against its PyTorch reference.
Our rows carry speedup_vs_torch_int8, their ratio to the PyTorch path of the same format.

Decode rows report GB/s and frac_copy_bw: the bytes the layer must move (weights and their
scales, activations and their scales, bias, output) over the time, against the copy bandwidth
measured in the same run. Prefill rows report TFLOP/s (2 * M * N * K; int8 ops for W8A8, so
TOPS there). Before any timing, each of our kernels' output is checked against the PyTorch
path's (relative to its largest value); a wrong kernel raises instead of reporting a time.
torch._int_mm needs M > 16 on CUDA (and may be missing elsewhere): where it refuses, its row is
skipped with the reason printed, and the check uses int8_matmul's reference instead.

Under ctx.smoke (CPU, Triton interpreter) a tiny fp32 layer set (hidden 128, M = 1 / 16, and 33
as the prefill stand-in) runs: the timings prove the benchmark works; they are not performance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qwen_vl_triton import kernels
from qwen_vl_triton.benchmarks.compile_check.launches import TextShape, rank_heads, released_models
from qwen_vl_triton.kernels.target import interpreting

if TYPE_CHECKING:
    from qwen_vl_triton.benchmarks.common import BenchContext

FAMILY = "int8"

# The Triton launchers themselves, whatever QVL_KERNELS says (op.__wrapped__ is the launcher).
int8_triton = kernels.int8_matmul.__wrapped__
w8a16_triton = kernels.w8a16_matmul.__wrapped__
quantize_triton = kernels.quantize_per_token.__wrapped__

DECODE_ROWS, PREFILL_ROWS = (1, 4, 16, 64), (2048,)
SMOKE_DECODE_ROWS, SMOKE_PREFILL_ROWS = (1, 16), (33,)
# (checkpoint in model_shapes.json, tensor-parallel world sizes)
MODELS = (("Qwen2.5-VL-7B", (1,)), ("Qwen2.5-VL-72B", (1, 4, 8)))
SMOKE_SHAPE = TextShape(hidden=128, intermediate=192, heads=2, kv_heads=1, head_dim=64)
# Largest |ours - torch| / max|torch| accepted before timing: bf16 output rounding (and, for
# W8A16, the baseline's weights rounded to bf16 after scaling) stays well below these.
TOLERANCE = {"int8_matmul": 1e-2, "w8a16_matmul": 2e-2}


def linear_layers(shape: TextShape, world: int) -> list[tuple[str, int, int, bool]]:
    """(name, N, K, has bias) of each LLM linear layer's shard on one rank of `world`, or [] when
    `world` cannot split the heads."""
    heads = rank_heads(shape.heads, shape.kv_heads, world)
    if heads is None:
        return []
    hq, hk = heads
    d = shape.head_dim
    inter = -(-shape.intermediate // world)  # the largest balanced share
    return [("qkv", (hq + 2 * hk) * d, shape.hidden, True), ("o", shape.hidden, hq * d, False),
            ("gate_up", 2 * inter, shape.hidden, False), ("down", shape.hidden, inter, False)]


def _attempt(fn: Callable[[], torch.Tensor], what: str) -> torch.Tensor | None:
    """fn() once, or None with the reason printed where it refuses (a baseline this device or
    shape does not support)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any refusal means "no such baseline here"
        print(f"  {what}: skipped ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
        return None


def _checked(op: str, shape: str, ours: torch.Tensor, base: torch.Tensor, base_impl: str) -> str:
    """The note of our row: its largest difference from `base` relative to base's largest value.
    Raises when it exceeds TOLERANCE[op], so a wrong kernel reports no time."""
    err = float((ours.float() - base.float()).abs().max()) / max(float(base.float().abs().max()), 1e-30)
    if not err <= TOLERANCE[op]:  # NaN fails too
        raise AssertionError(f"{op} {shape}: max |ours - {base_impl}| / max |{base_impl}| = {err:.2e} "
                             f"> {TOLERANCE[op]:.0e}; not timing a wrong kernel")
    return f"max abs(ours - {base_impl}) / max = {err:.1e}"  # no pipes: a markdown table cell


def _time_row(ctx: BenchContext, op: str, shape: str, dtype: torch.dtype, impl: str, fn: Callable[[], object],
              metric: dict[str, float], baseline_ms: float | None = None, torch_ms: float | None = None,
              note: str = "") -> float:
    """Time fn and record its row; with torch_ms (ours against the PyTorch path of the same
    format) the row also gets speedup_vs_torch_int8. Returns the median ms."""
    ms = ctx.time(fn)
    row = ctx.record(FAMILY, op, shape, dtype, impl, ms, baseline_ms=baseline_ms, note=note, **metric)
    if torch_ms is not None:
        row["speedup_vs_torch_int8"] = round(torch_ms / ms, 3)
    return ms


@dataclass
class QuantLinear:
    """One linear layer's weights in every form the rows use."""

    w_q: torch.Tensor  # int8 [N, K]
    w_scale: torch.Tensor  # fp32 [N], per output channel
    w_float: torch.Tensor  # [N, K] in the activation dtype: the values the int8 paths compute with
    w_scale_d: torch.Tensor  # [N, 1] in the activation dtype (fp32 scales would promote the dequant)
    bias: torch.Tensor | None  # [N] in the activation dtype (qkv only)

    @classmethod
    def random(cls, n: int, k: int, bias: bool, dtype: torch.dtype, device: torch.device) -> QuantLinear:
        w_q, w_scale = kernels.quantize_per_token.reference(0.02 * torch.randn(n, k, device=device))
        return cls(w_q, w_scale, (w_q.float() * w_scale[:, None]).to(dtype), w_scale.to(dtype)[:, None],
                   0.02 * torch.randn(n, device=device, dtype=dtype) if bias else None)


def bench_linear(ctx: BenchContext, name: str, lin: QuantLinear, m: int, prefill: bool) -> None:
    """One linear layer at M rows: the float GEMM, then W8A8 and W8A16, torch's and ours. Decode
    rows count the bytes moved, prefill rows the FLOPs."""
    w_q, w_scale, b = lin.w_q, lin.w_scale, lin.bias
    dtype = lin.w_float.dtype
    n, k = w_q.shape
    x = torch.randn(m, k, device=ctx.device, dtype=dtype)
    a_q, a_scale = kernels.quantize_per_token.reference(x)
    shape = f"{name} [{m}, {k}] x [{n}, {k}]"
    size = x.element_size()

    def metric(w_bytes: int, x_bytes: int) -> dict[str, float]:
        if prefill:
            return {"flops": 2.0 * m * n * k}
        return {"nbytes": w_bytes + x_bytes + (n * size if b is not None else 0) + m * n * size}

    float_ms = _time_row(ctx, "linear", shape, dtype, "torch F.linear", lambda: F.linear(x, lin.w_float, b),
                         metric(n * k * size, m * k * size))

    # W8A8: int8 activations with [M] scales, int8 weights with [N] scales.
    def int_mm() -> torch.Tensor:
        out = torch._int_mm(a_q, w_q.t()).float() * a_scale[:, None] * w_scale
        return (out + b if b is not None else out).to(dtype)

    def ours_w8a8() -> torch.Tensor:
        return int8_triton(a_q, w_q, a_scale, w_scale, bias=b, out_dtype=dtype)

    w8a8 = metric(n * k + n * 4, m * k + m * 4)
    base = _attempt(int_mm, f"{shape}: torch _int_mm")
    base_impl, torch_ms = "torch _int_mm + scales", None
    if base is None:
        base_impl = "int8_matmul reference"
        base = kernels.int8_matmul.reference(a_q, w_q, a_scale, w_scale, bias=b, out_dtype=dtype)
    else:
        torch_ms = _time_row(ctx, "int8_matmul", shape, dtype, base_impl, int_mm, w8a8, baseline_ms=float_ms)
    note = _checked("int8_matmul", shape, ours_w8a8(), base, base_impl)
    _time_row(ctx, "int8_matmul", shape, dtype, "triton", ours_w8a8, w8a8, baseline_ms=float_ms,
              torch_ms=torch_ms, note=note)

    # W8A16: float activations, int8 weights with [N] scales.
    def dequant_linear() -> torch.Tensor:
        return F.linear(x, w_q.to(dtype) * lin.w_scale_d, b)

    def ours_w8a16() -> torch.Tensor:
        return w8a16_triton(x, w_q, w_scale, bias=b)

    w8a16 = metric(n * k + n * 4, m * k * size)
    note = _checked("w8a16_matmul", shape, ours_w8a16(), dequant_linear(), "torch dequant + F.linear")
    torch_ms = _time_row(ctx, "w8a16_matmul", shape, dtype, "torch dequant + F.linear", dequant_linear, w8a16,
                         baseline_ms=float_ms)
    _time_row(ctx, "w8a16_matmul", shape, dtype, "triton", ours_w8a16, w8a16, baseline_ms=float_ms,
              torch_ms=torch_ms, note=note)


def bench_quantize(ctx: BenchContext, tag: str, m: int, k: int, dtype: torch.dtype) -> None:
    """quantize_per_token of [M, K] against its PyTorch reference (bytes moved, at every M: it is
    memory-bound); q may differ by one step where a value lands on a rounding half, the scales
    must agree."""
    x = torch.randn(m, k, device=ctx.device, dtype=dtype)
    shape = f"{tag} [{m}, {k}]"
    (q, scale), (q_ref, scale_ref) = quantize_triton(x), kernels.quantize_per_token.reference(x)
    q_err = int((q.int() - q_ref.int()).abs().max())
    s_err = float(((scale - scale_ref).abs() / scale_ref).max())
    if q_err > 1 or not s_err <= 1e-5:
        raise AssertionError(f"quantize_per_token {shape}: max |q - reference| = {q_err}, scale rel err "
                             f"{s_err:.1e}; not timing a wrong kernel")
    metric = {"nbytes": m * k * (x.element_size() + 1) + m * 4}  # x read, q and scales written
    ref_ms = _time_row(ctx, "quantize_per_token", shape, dtype, "torch reference",
                       lambda: kernels.quantize_per_token.reference(x), metric)
    _time_row(ctx, "quantize_per_token", shape, dtype, "triton", lambda: quantize_triton(x), metric,
              baseline_ms=ref_ms, note=f"q within {q_err} of the reference, scale rel err {s_err:.1e}")


def run(ctx: BenchContext) -> None:
    """Record the int8 rows into ctx (see the module docstring for the shapes)."""
    if ctx.device.type == "cpu" and not interpreting():
        print("bench_quant: CPU without TRITON_INTERPRET=1: the Triton kernels cannot run, skipped")
        return
    torch.manual_seed(0)  # every device's generator
    if ctx.smoke:
        if interpreting():
            print("int8: tiny fp32 layers in Triton's CPU interpreter: timings prove the bench runs, NOT performance")
        dtype = torch.float32
        shapes = [("smoke", SMOKE_SHAPE, 1)]
        decode, prefill = SMOKE_DECODE_ROWS, SMOKE_PREFILL_ROWS
    else:
        dtype = torch.bfloat16
        models = released_models()
        shapes = [(f"{name.removeprefix('Qwen2.5-VL-')} tp{world}", models[name][0], world)
                  for name, worlds in MODELS for world in worlds]
        decode, prefill = DECODE_ROWS, PREFILL_ROWS
    for tag, shape, world in shapes:
        layers = linear_layers(shape, world)
        for layer, n, k, bias in layers:
            lin = QuantLinear.random(n, k, bias, dtype, ctx.device)
            for m in decode + prefill:
                bench_linear(ctx, f"{tag} {layer}", lin, m, m in prefill)
            del lin  # the 72B tp1 layers hold GBs
        for k in sorted({k for _, _, k, _ in layers}):  # the inputs of qkv / gate_up, o, down
            for m in decode + prefill:
                bench_quantize(ctx, tag, m, k, dtype)
