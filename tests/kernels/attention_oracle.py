"""Float64 attention written for the tests (independent of the kernels' PyTorch references) and
a builder of paged KV caches with shuffled block tables and NaN in every slot no sequence owns."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tests.helpers import DEVICE, nan_filled

# Attention sums over a whole row of keys: allow a few units of the output dtype's rounding
# (bf16 on a GPU also rounds P to bf16 before the PV dot).
ATTENTION_SCALE = 4.0

# (Hq, Hk) configs: Qwen2.5-VL-7B LLM 28/4 and 3B 12/2 as they are; ViT 16/16 scaled to 4/4,
# a single kv head 8/1, and 72B/32B's ratio 5 (40/8) scaled to 5/1 (pads 5 heads to 8 rows).
HEAD_CONFIGS = [(28, 4), (12, 2), (4, 4), (8, 1), (5, 1)]
HEAD_DIMS = [64, 80, 128]


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                first_pos: int | None = None) -> torch.Tensor:
    """Softmax attention of one sequence in float64.

    q: [L, Hq, D]; k, v: [N, Hk, D]; query head h uses kv head h // (Hq // Hk).
    first_pos: None = every query sees every key; else query i sits at position first_pos + i
    and sees keys 0 .. first_pos + i (causal; first_pos = 0 for plain causal, N - L for a
    prefill continuing a cached prefix). Returns [L, Hq, D] float64 on the CPU.
    """
    q, k, v = (x.detach().cpu().double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [N, Hq, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, L, N]
    if first_pos is not None:
        pos = first_pos + torch.arange(q.shape[0])
        hidden = torch.arange(k.shape[0])[None, :] > pos[:, None]  # [L, N]
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def varlen64(q, k, v, lens: list[int], causal: bool, scale: float | None = None) -> torch.Tensor:
    """attention64 over packed sequences of the given lengths: [T, Hq, D] float64."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        out[sl] = attention64(q[sl], k[sl], v[sl], scale, 0 if causal else None)
        start += n
    return out


def cu_seqlens(lens: list[int]) -> torch.Tensor:
    """[B+1] int32 prefix sums on DEVICE."""
    return torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


@dataclass
class PagedCache:
    k_cache: torch.Tensor  # [NB, BS, Hk, D], NaN wherever no sequence has a token
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks + extra] int32, shuffled ids; padding -> a NaN block
    context_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence [ctx, Hk, D] (cache dtype): what the cache holds
    values: list[torch.Tensor]


def build_paged_cache(ctx_lens: list[int], hk: int, d: int, block_size: int, dtype: torch.dtype,
                      seed: int, extra_columns: int = 2, spare_blocks: int = 3) -> PagedCache:
    """A KV cache holding random keys/values for each sequence in randomly permuted blocks.

    Unused blocks, the unused tail of each sequence's last block, and the table's padding
    columns (pointing at an unused block) are all NaN, so any read outside a sequence's
    context shows in the result.
    """
    g = torch.Generator().manual_seed(seed)
    n_blocks = [math.ceil(n / block_size) for n in ctx_lens]
    total = sum(n_blocks) + spare_blocks
    k_cache = nan_filled((total, block_size, hk, d), dtype)
    v_cache = nan_filled((total, block_size, hk, d), dtype)
    perm = torch.randperm(total, generator=g)
    spare = int(perm[-1])  # never written: stays NaN
    table = torch.full((len(ctx_lens), max(n_blocks) + extra_columns), spare, dtype=torch.int32)
    keys, values = [], []
    used = 0
    for b, n in enumerate(ctx_lens):
        table[b, : n_blocks[b]] = perm[used : used + n_blocks[b]].to(torch.int32)
        used += n_blocks[b]
        kb = torch.randn(n, hk, d, generator=g, dtype=torch.float64).to(dtype)
        vb = torch.randn(n, hk, d, generator=g, dtype=torch.float64).to(dtype)
        pos = torch.arange(n)
        blocks = table[b, pos // block_size].long()
        k_cache[blocks, pos % block_size] = kb.to(DEVICE)
        v_cache[blocks, pos % block_size] = vb.to(DEVICE)
        keys.append(kb)
        values.append(vb)
    return PagedCache(k_cache, v_cache, table.to(DEVICE),
                      torch.tensor(ctx_lens, dtype=torch.int32, device=DEVICE), keys, values)
