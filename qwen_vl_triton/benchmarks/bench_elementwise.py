"""Norms, activation and rotary kernels against PyTorch eager, torch.compile and liger-kernel.

Shapes are the real ones of benchmarks/model_shapes.json: [tokens, hidden] for the LLM norms
(Qwen2.5-VL-7B 3584, 72B 8192), [patches, 1280] for the vision LayerNorm, [tokens, 2*18944]
for the 7B MLP, [T, 28|4, 128] for MRoPE and [5476, 16, 80] for the vision rotary of one
1024x1024 image. Bytes counted are those each op must move (inputs read + outputs written).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qwen_vl_triton import kernels
from qwen_vl_triton.benchmarks.common import BenchContext


def _liger_baselines() -> dict[str, Callable]:
    """liger-kernel's versions of our ops, where the package imports (GPU only)."""
    found: dict[str, Callable] = {}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        found["rms_norm"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama")
    except Exception:  # noqa: BLE001 - any import failure means "no baseline"
        pass
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        found["layer_norm"] = lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)
    except Exception:  # noqa: BLE001
        pass
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        found["silu_and_mul"] = lambda x: LigerSiLUMulFunction.apply(*x.chunk(2, dim=-1))
    except Exception:  # noqa: BLE001
        pass
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        found["add_rms_norm"] = lambda x, r, w, eps: LigerFusedAddRMSNormFunction.apply(
            x, r, w, eps, 0.0, "llama")
    except Exception:  # noqa: BLE001
        pass
    return found


def _compiled(fn: Callable, device: torch.device) -> Callable | None:
    """torch.compile of a reference where it builds (devices only: CPU compiles are not the point)."""
    if device.type == "cpu":
        return None
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001
        return None


def _compare(ctx: BenchContext, op_name: str, shape: str, dtype: torch.dtype, nbytes: int,
             args: tuple, baselines: dict[str, Callable]) -> None:
    """Time our Triton launcher and each baseline on the same inputs; ratios against eager."""
    op = getattr(kernels, op_name)
    eager_ms = ctx.time(lambda: op.reference(*args))
    ctx.record("elementwise", op_name, shape, dtype, "torch-eager", eager_ms, nbytes=nbytes)
    ours_ms = ctx.time(lambda: op.__wrapped__(*args))
    ctx.record("elementwise", op_name, shape, dtype, "triton (ours)", ours_ms, nbytes=nbytes,
               baseline_ms=eager_ms)
    for name, fn in baselines.items():
        try:
            fn(*args)  # build / check it runs before timing
        except Exception as e:  # noqa: BLE001
            print(f"  {op_name} {name}: skipped ({type(e).__name__}: {str(e)[:80]})")
            continue
        ms = ctx.time(lambda fn=fn: fn(*args))
        row = ctx.record("elementwise", op_name, shape, dtype, name, ms, nbytes=nbytes)
        row["ours_speedup_vs_this"] = round(ms / ours_ms, 3)


def run(ctx: BenchContext) -> None:
    dev = ctx.device
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    size = torch.finfo(dtype).bits // 8
    liger = _liger_baselines()
    r = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731

    def baselines(op_name: str) -> dict[str, Callable]:
        found = {}
        compiled = _compiled(getattr(kernels, op_name).reference, dev)
        if compiled is not None:
            found["torch.compile"] = compiled
        if op_name in liger:
            found["liger-kernel"] = liger[op_name]
        return found

    token_counts = [4, 33] if ctx.smoke else [1, 64, 4096, 16384]
    hiddens = [256] if ctx.smoke else [3584, 8192]
    for tokens in token_counts:
        for hidden in hiddens:
            x, res, w = r(tokens, hidden), r(tokens, hidden), r(hidden)
            shape = f"[{tokens}, {hidden}]"
            _compare(ctx, "rms_norm", shape, dtype, 2 * x.numel() * size, (x, w, 1e-6), baselines("rms_norm"))
            _compare(ctx, "add_rms_norm", shape, dtype, 4 * x.numel() * size, (x, res, w, 1e-6),
                     baselines("add_rms_norm"))

    for patches in [16] if ctx.smoke else [5476, 16384]:
        x, w, b = r(patches, 1280), r(1280), r(1280)
        _compare(ctx, "layer_norm", f"[{patches}, 1280]", dtype, 2 * x.numel() * size, (x, w, b, 1e-6),
                 baselines("layer_norm"))

    inter = 512 if ctx.smoke else 18944
    for tokens in [4] if ctx.smoke else [1, 64, 4096]:
        x = r(tokens, 2 * inter)
        _compare(ctx, "silu_and_mul", f"[{tokens}, 2x{inter}]", dtype, 3 * tokens * inter * size, (x,),
                 baselines("silu_and_mul"))

    patches = 16 if ctx.smoke else 5476
    x = r(patches, 16, 80)
    angles = torch.randn(patches, 40, device=dev)
    _compare(ctx, "apply_rope", f"[{patches}, 16, 80]", dtype, 2 * x.numel() * size,
             (x, angles.cos(), angles.sin()), baselines("apply_rope"))

    for tokens in [4] if ctx.smoke else [1, 64, 4096, 16384]:
        q, k = r(tokens, 28, 128), r(tokens, 4, 128)
        positions = torch.randint(0, 4096, (3, tokens), device=dev)
        nbytes = 2 * (q.numel() + k.numel()) * size + positions.numel() * 8
        _compare(ctx, "apply_mrope", f"q[{tokens}, 28, 128] k[{tokens}, 4, 128]", dtype, nbytes,
                 (q, k, positions, [16, 24, 24], 1e6), baselines("apply_mrope"))
