"""Attention benchmarks: ViT full / window attention (varlen_attention), LLM causal prefill, paged
decode (paged_attention), paged prefill over cached prefixes (paged_prefill_attention) and the KV
cache write (write_kv_cache) at Qwen2.5-VL shapes, against PyTorch baselines (SDPA, index_copy_)
and flash-attn where it is installed.

Shapes
- ViT: 16 heads x 80 (Qwen2.5-VL vision tower). A 1024x1024 image is resized to 1036x1036 (multiples
  of 28) = 74 x 74 = 5476 patches. Full attention: one sequence of 5476. Window attention: windows
  of 4x4 merged tokens = 64 patches; 37 merged columns give 9 full windows and one 1-merged-token
  wide edge window per axis, so windows of 64, 16 and 4 patches (100 windows).
- LLM prefill: 28 query / 4 kv heads x 128 (Qwen2.5-VL-7B), causal, 4096 tokens.
- Decode: 28/4 x 128, bf16, cache block 128, batch 1/16/64 x context 1k/4k/16k/32k. Bandwidth is
  the K+V bytes the kernel must read (B * ctx * Hk * D * 2 tensors * 2 bytes) per second, and
  frac_copy_bw its fraction of the measured device copy bandwidth.
- Paged prefill: 28/4 x 128, bf16, block 128: 4 sequences of 512 new tokens after cached prefixes
  of 0 / 1.5k / 3.5k / 7.5k tokens (prefix-cache hits, chunked prefill), against gather + SDPA.
- KV write: 8192 tokens of 4 kv heads x 128 into a shuffled bf16 cache (a prefill step's write),
  bandwidth = K+V bytes read + written, against the PyTorch reference (index_copy_).

Under ctx.smoke (CPU, Triton interpreter) only a tiny fp32 set runs: the timings prove the
benchmark works end to end; they are not performance figures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen_vl_triton import kernels
from qwen_vl_triton.kernels.target import interpreting

if TYPE_CHECKING:  # run_all.py passes the context; importing it here would tie module paths
    from common import BenchContext

FAMILY = "attention"

# The Triton launchers themselves, whatever QVL_KERNELS says (op.__wrapped__ is the launcher).
varlen_triton = kernels.varlen_attention.__wrapped__
decode_triton = kernels.paged_attention.__wrapped__
prefill_triton = kernels.paged_prefill_attention.__wrapped__
write_triton = kernels.write_kv_cache.__wrapped__


def _flash_attn():
    """flash_attn's module when installed (CUDA only), else None."""
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _sdpa_flash(device: torch.device):
    """On CUDA, SDPA restricted to its flash backend (memory-efficient as the fallback for what
    flash refuses); elsewhere the default choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def vit_window_lengths(patches_per_side: int = 74, merge: int = 2, window_merged: int = 4) -> list[int]:
    """Patch counts of Qwen2.5-VL's attention windows over a square image of patches_per_side^2
    patches: windows of window_merged^2 merged tokens (merge^2 patches each), smaller at the edges."""
    merged = patches_per_side // merge
    sides = [min(window_merged, merged - s) for s in range(0, merged, window_merged)]
    return [h * w * merge * merge for h in sides for w in sides]


def _cu(lens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[L, H, D] -> a [1, H, L, D] view: SDPA's fused kernels (flash on CUDA and CPU, memory-efficient)
    take 4D inputs only; 3D ones fall back to the math path or are refused."""
    return x.transpose(0, 1)[None]


def _sdpa_per_sequence(q, k, v, lens: list[int], causal: bool) -> Callable[[], torch.Tensor]:
    """Baseline: one SDPA call per sequence (4D views of the packed tensors)."""
    bounds = torch.tensor([0, *lens]).cumsum(0).tolist()

    def run():
        out = torch.empty_like(q)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            o = F.scaled_dot_product_attention(_heads_first(q[s:e]), _heads_first(k[s:e]), _heads_first(v[s:e]),
                                               is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
            out[s:e] = o[0].transpose(0, 1)
        return out

    return run


def _race(ctx: BenchContext, op: str, shape: str, dtype: torch.dtype, base_impl: str,
          baseline: Callable[[], torch.Tensor | None], triton_run: Callable[[], torch.Tensor | None],
          check: bool = True, **metric: float) -> float:
    """Time the baseline and the Triton launcher and record both rows (metric: nbytes or flops);
    with check, the Triton row notes its largest difference from the baseline. Returns the
    baseline's median ms."""
    note = ""
    if check:
        err = float((triton_run().float() - baseline().float()).abs().max())
        note = f"max |triton - {base_impl}| = {err:.2e}"
    base_ms = ctx.time(baseline)
    ctx.record(FAMILY, op, shape, dtype, base_impl, base_ms, **metric)
    ctx.record(FAMILY, op, shape, dtype, "triton", ctx.time(triton_run), baseline_ms=base_ms, note=note, **metric)
    return base_ms


def bench_varlen(ctx: BenchContext, name: str, lens: list[int], hq: int, hk: int, d: int,
                 dtype: torch.dtype, causal: bool) -> None:
    """varlen_attention vs per-sequence SDPA (flash backend forced on CUDA) and flash-attn."""
    device = ctx.device
    t = sum(lens)
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
    cu = _cu(lens, device)
    max_len = max(lens)
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    flops = 4.0 * pairs * hq * d  # QK^T and PV, 2 flops per multiply-add
    shape = f"{name}: {len(lens)} seqs, T={t}, max={max_len}, H={hq}/{hk}, D={d}, causal={causal}"

    per_sequence = _sdpa_per_sequence(q, k, v, lens, causal)

    def sdpa_run():
        with _sdpa_flash(device):
            return per_sequence()

    base_ms = _race(ctx, "varlen_attention", shape, dtype, "torch-sdpa-per-seq", sdpa_run,
                    lambda: varlen_triton(q, k, v, cu, max_len, causal=causal), flops=flops)
    fa = _flash_attn()
    if fa is not None and device.type == "cuda" and dtype != torch.float32:
        fa_ms = ctx.time(lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal))
        ctx.record(FAMILY, "varlen_attention", shape, dtype, "flash-attn", fa_ms, flops=flops,
                   baseline_ms=base_ms)


def _paged_cache(ctx_lens: list[int], hk: int, d: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
    """Caches holding sequences of ctx_lens tokens, blocks shuffled across sequences; block tables
    padded with block 0 to the longest."""
    per_seq = max(math.ceil(n / block_size) for n in ctx_lens)
    n_blocks = len(ctx_lens) * per_seq
    k_cache = torch.randn(n_blocks, block_size, hk, d, device=device, dtype=dtype)
    v_cache = torch.randn(n_blocks, block_size, hk, d, device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    tables = torch.randperm(n_blocks, generator=g).to(torch.int32).view(len(ctx_lens), per_seq).to(device)
    lens = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables, lens


def _gathered(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence as a [1, Hk, n, D] view: the copy a block-table-unaware
    kernel needs."""
    return cache[table_row].flatten(0, 1)[:n].transpose(0, 1)[None]


def decode_gather_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                       ctx_len: int) -> Callable[[], torch.Tensor]:
    """Decode's PyTorch baseline: every sequence's ctx_len cached tokens gathered through its table
    ([B, blocks, BS, Hk, D] -> [B, Hk, ctx, D], the copy a block-table-unaware kernel needs), then
    SDPA for its one query q [B, Hq, D]."""
    def gather_sdpa() -> torch.Tensor:
        k = k_cache[tables].flatten(1, 2)[:, :ctx_len].transpose(1, 2)
        v = v_cache[tables].flatten(1, 2)[:, :ctx_len].transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    return gather_sdpa


def prefill_gather_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        ctx_lens: list[int], q_len: int) -> Callable[[], torch.Tensor]:
    """Paged prefill's PyTorch baseline: per sequence (its q_len new queries of q [B * q_len, Hq, D]
    after ctx_lens[b] - q_len cached tokens), a gather of its K/V and SDPA with the causal mask
    shifted by the prefix."""
    hq, hk = q.shape[1], k_cache.shape[2]
    masks = [torch.arange(n, device=q.device) <= torch.arange(n - q_len, n, device=q.device)[:, None]
             for n in ctx_lens]

    def gather_sdpa() -> torch.Tensor:
        out = torch.empty_like(q)
        for b, n in enumerate(ctx_lens):
            rows = slice(b * q_len, (b + 1) * q_len)
            o = F.scaled_dot_product_attention(_heads_first(q[rows]), _gathered(k_cache, tables[b], n),
                                               _gathered(v_cache, tables[b], n), attn_mask=masks[b],
                                               enable_gqa=hq != hk)
            out[rows] = o[0].transpose(0, 1)
        return out
    return gather_sdpa


def bench_decode(ctx: BenchContext, batch: int, ctx_len: int, hq: int, hk: int, d: int, block_size: int,
                 dtype: torch.dtype) -> None:
    """paged_attention vs gather + SDPA, reporting the achieved K+V read bandwidth."""
    device = ctx.device
    k_cache, v_cache, tables, lens = _paged_cache([ctx_len] * batch, hk, d, block_size, dtype, device)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype)
    kv_bytes = 2.0 * batch * ctx_len * hk * d * k_cache.element_size()
    shape = f"decode B={batch} ctx={ctx_len} H={hq}/{hk} D={d} BS={block_size}"

    gather_sdpa = decode_gather_sdpa(q, k_cache, v_cache, tables, ctx_len)
    base_ms = _race(ctx, "paged_attention", shape, dtype, "torch-gather-sdpa", gather_sdpa,
                    lambda: decode_triton(q, k_cache, v_cache, tables, lens), nbytes=kv_bytes)
    fa = _flash_attn()
    if fa is not None and device.type == "cuda" and dtype != torch.float32:
        try:  # flash-attn 2 wants paged blocks of a multiple of 256 tokens: may refuse BS=128
            fa_ms = ctx.time(lambda: fa.flash_attn_with_kvcache(q[:, None], k_cache, v_cache,
                                                                cache_seqlens=lens, block_table=tables))
            ctx.record(FAMILY, "paged_attention", shape, dtype, "flash-attn", fa_ms, nbytes=kv_bytes,
                       baseline_ms=base_ms)
        except RuntimeError as e:
            print(f"  flash-attn refused {shape}: {str(e)[:120]}")


def bench_paged_prefill(ctx: BenchContext, prefixes: list[int], q_len: int, hq: int, hk: int, d: int,
                        block_size: int, dtype: torch.dtype) -> None:
    """paged_prefill_attention (q_len new tokens per sequence after cached prefixes) vs, per
    sequence, a gather of its K/V and SDPA with the causal mask shifted by the prefix."""
    device = ctx.device
    ctx_lens = [p + q_len for p in prefixes]
    k_cache, v_cache, tables, lens = _paged_cache(ctx_lens, hk, d, block_size, dtype, device)
    q = torch.randn(len(prefixes) * q_len, hq, d, device=device, dtype=dtype)
    cu_q = _cu([q_len] * len(prefixes), device)
    flops = 4.0 * hq * d * sum(q_len * (n - q_len) + q_len * (q_len + 1) // 2 for n in ctx_lens)
    shape = f"paged prefill {len(prefixes)} seqs x {q_len} new after {'/'.join(map(str, prefixes))} cached, " \
            f"H={hq}/{hk} D={d} BS={block_size}"

    _race(ctx, "paged_prefill_attention", shape, dtype, "torch-gather-sdpa",
          prefill_gather_sdpa(q, k_cache, v_cache, tables, ctx_lens, q_len),
          lambda: prefill_triton(q, k_cache, v_cache, tables, cu_q, lens), flops=flops)


def bench_write_kv(ctx: BenchContext, n_tokens: int, hk: int, d: int, block_size: int, dtype: torch.dtype) -> None:
    """write_kv_cache vs the PyTorch reference (index_copy_), n_tokens to shuffled slots."""
    device = ctx.device
    n_blocks = 2 * math.ceil(n_tokens / block_size)  # half the cache stays untouched
    k_cache = torch.randn(n_blocks, block_size, hk, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    g = torch.Generator(device="cpu").manual_seed(0)
    slots = torch.randperm(n_blocks * block_size, generator=g)[:n_tokens].to(device)
    k, v = (torch.randn(n_tokens, hk, d, device=device, dtype=dtype) for _ in range(2))
    nbytes = 2.0 * 2 * n_tokens * hk * d * k.element_size()  # K and V, read and written
    shape = f"write {n_tokens} tokens Hk={hk} D={d} BS={block_size}"
    _race(ctx, "write_kv_cache", shape, dtype, "torch-index_copy",
          lambda: kernels.write_kv_cache.reference(k, v, k_cache, v_cache, slots),
          lambda: write_triton(k, v, k_cache, v_cache, slots), check=False, nbytes=nbytes)


def run(ctx: BenchContext) -> None:
    """Record the attention rows into ctx (see the module docstring for the shapes)."""
    if ctx.device.type == "cpu" and not interpreting():
        print("bench_attention: CPU without TRITON_INTERPRET=1: the Triton kernels cannot run, skipped")
        return
    if ctx.smoke:
        # Tiny fp32 shapes in the interpreter: proves the benchmark runs, measures nothing.
        bench_varlen(ctx, "smoke full", [40, 23], 2, 2, 64, torch.float32, causal=False)
        bench_varlen(ctx, "smoke windows", [16, 16, 8, 4], 2, 2, 80, torch.float32, causal=False)
        bench_varlen(ctx, "smoke prefill", [50], 4, 2, 64, torch.float32, causal=True)
        bench_decode(ctx, 2, 300, 4, 2, 64, 16, torch.float32)
        bench_paged_prefill(ctx, [0, 40], 24, 4, 2, 64, 16, torch.float32)
        bench_write_kv(ctx, 64, 2, 64, 16, torch.float32)
        return
    dtype = torch.bfloat16
    bench_varlen(ctx, "ViT full 1024x1024", [74 * 74], 16, 16, 80, dtype, causal=False)
    bench_varlen(ctx, "ViT window 1024x1024", vit_window_lengths(), 16, 16, 80, dtype, causal=False)
    bench_varlen(ctx, "LLM prefill", [4096], 28, 4, 128, dtype, causal=True)
    for batch in (1, 16, 64):
        for ctx_len in (1024, 4096, 16384, 32768):
            bench_decode(ctx, batch, ctx_len, 28, 4, 128, 128, dtype)
    bench_paged_prefill(ctx, [0, 1536, 3584, 7680], 512, 28, 4, 128, 128, dtype)
    bench_write_kv(ctx, 8192, 4, 128, 128, dtype)
