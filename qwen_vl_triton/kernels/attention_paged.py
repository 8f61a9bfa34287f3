"""Attention over the paged KV cache: decode (paged_attention) and prefill with cached prefixes
(paged_prefill_attention, also chunked prefill).

Cache layout: k_cache, v_cache [NB, BS, Hk, D]; block_tables[b, j] is the cache block holding
tokens j*BS .. j*BS + BS - 1 of sequence b. Only the first cdiv(context_lens[b], BS) entries of a
row are read, so a table may be wider than a sequence needs (padding entries are never loaded).

Both kernels walk a sequence's KV one key tile (BLOCK_N keys) per step: a cache block of BS slots
is BS / BLOCK_N tiles (BLOCK_N = min(BS, the target's key tile): a whole 128-slot block as one
tile overflows Ascend's unified buffer and spills on CUDA). A tile's block id is loaded as a
scalar, then its [BLOCK_N, D] keys and values of one kv head as contiguous rows with int64 base
offsets (a cache can pass 2^31 elements). Positions are compared in int32.

GQA: a program owns one kv head and stacks the query heads of its group as tile rows (the layout
of kernels/attention_common.py), so each K/V tile is read once for all heads that share it.
Head counts are runtime values.

Decode is flash-decoding: work item = (sequence, kv head, split); the splits divide a sequence's
blocks so that batch 1 with a 32k context still gives every core work. Each split writes its
partial max / sum / normalised output in fp32 to scratch and a second kernel combines them. The
split count comes from the table width (block_tables.shape[1]), B * Hk and the core count: no
host sync (an engine builds the table per step as wide as its longest sequence, so the width
tracks the longest context; a much wider table only makes some splits empty, not wrong).

One module for both paged kernels (decode and prefill over cached prefixes), their launchers and
references: they share the block-table walk and the split-KV plan, and the compile check and the
tests read them as one family. Its length is those two kernels, not unrelated code.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.attention_common import (
    LOG2E,
    attend_kv_tile,
    attention_reference,
    empty_accumulators,
    group_pad,
    head_dim_blocks,
    kv_tiles_offsets,
    load_query_tile,
    load_work_query,
    query_block_table,
    query_tile,
    rows_bound,
    store_query_tile,
    work_item,
)
from qwen_vl_triton.kernels.plans import AttentionPlan
from qwen_vl_triton.kernels.target import Target, Work, current_target

# A split covers at least this many tokens: below that its fixed costs (query load, partial
# write, the reduce) outweigh the K/V it reads.
MIN_SPLIT_TOKENS = 256
# Upper bound on splits per sequence: the reduce kernel walks them in REDUCE_CHUNK pieces.
MAX_SPLITS = 128
REDUCE_CHUNK = 16
# The decode reference's SDPA batches: gathered K elements per call (4 MiB of fp32).
REFERENCE_DECODE_ELEMS = 1 << 20


@triton.jit
def _cache_tile(bt_row, i, k_head, v_head, stride_kcb, stride_vcb, stride_kcs, stride_vcs,
                TILES_PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """K/V pointers of the first row of key tile i of a sequence (keys i * BLOCK_N ..): piece
    i % TILES_PER_BLOCK of cache block bt_row[i // TILES_PER_BLOCK], from one kv head's base
    k_head / v_head; the block's offset is int64 (a cache can pass 2^31 elements)."""
    blk = tl.load(bt_row + i // TILES_PER_BLOCK).to(tl.int64)
    row = (i % TILES_PER_BLOCK) * BLOCK_N
    return k_head + blk * stride_kcb + row * stride_kcs, v_head + blk * stride_vcb + row * stride_vcs


@triton.jit
def _attend_cache_tiles(q, qt, qpos, ctx_len, lo, full_hi, hi, bt_row, k_head, v_head,
                        stride_kcb, stride_vcb, stride_kcs, stride_vcs, qk_scale,
                        CAUSAL: tl.constexpr, TILES_PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
                        HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Online softmax of query tile q (and its tail qt: head_dim_blocks) at positions qpos over
    key tiles lo .. hi - 1 of one sequence (tile i = keys i * BLOCK_N .. i * BLOCK_N + BLOCK_N - 1,
    through table row bt_row), keys 0 .. ctx_len - 1 visible. Tiles below full_hi are fully
    visible to every row and run unmasked; the rest are masked. Returns (m_i, l_i, acc, acct) as
    attend_kv_tile keeps them."""
    TAIL: tl.constexpr = BLOCK_DT > 0
    # Offsets of a key tile's [BLOCK_N, D] rows of one head, computed once: the tile loop only
    # moves a base pointer.
    d_ok, k_off, v_off, dt_ok, kt_off, vt_off = kv_tiles_offsets(stride_kcs, stride_vcs, BLOCK_N, BLOCK_D, BLOCK_DT,
                                                                 HEAD_DIM)
    m_i, l_i, acc, acct = empty_accumulators(BLOCK_M, BLOCK_D, BLOCK_DT)
    for i in range(lo, full_hi):
        k_tile, v_tile = _cache_tile(bt_row, i, k_head, v_head, stride_kcb, stride_vcb, stride_kcs, stride_vcs,
                                     TILES_PER_BLOCK, BLOCK_N)
        m_i, l_i, acc, acct = attend_kv_tile(q, qt, k_tile, v_tile, k_off, v_off, kt_off, vt_off, d_ok, dt_ok,
                                             i * BLOCK_N, ctx_len, qpos, qk_scale, m_i, l_i, acc, acct, False, CAUSAL,
                                             BLOCK_N, DOT_DTYPE, TAIL)
    for i in range(tl.maximum(full_hi, lo), hi):  # the partly visible tiles, if in range
        k_tile, v_tile = _cache_tile(bt_row, i, k_head, v_head, stride_kcb, stride_vcb, stride_kcs, stride_vcs,
                                     TILES_PER_BLOCK, BLOCK_N)
        m_i, l_i, acc, acct = attend_kv_tile(q, qt, k_tile, v_tile, k_off, v_off, kt_off, vt_off, d_ok, dt_ok,
                                             i * BLOCK_N, ctx_len, qpos, qk_scale, m_i, l_i, acc, acct, True, CAUSAL,
                                             BLOCK_N, DOT_DTYPE, TAIL)
    return m_i, l_i, acc, acct


# Sizes, head counts and the table's row stride are not specialised (== 1, % 16): they change
# from step to step (or rank to rank), and a new compile in the middle of serving gains nothing.
@triton.jit(do_not_specialize=["n_items", "num_splits", "blocks_per_split", "n_q_heads", "n_kv_heads", "group",
                              "stride_btb"])
def _paged_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, o_ptr, mpart_ptr, lpart_ptr, opart_ptr,
    n_items, num_splits, blocks_per_split, n_q_heads, n_kv_heads, group, qk_scale,
    stride_qb, stride_qh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_btb, stride_ob, stride_oh,
    G_PAD: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One decode query per sequence against its cached keys 0 .. context_lens[b] - 1.

    Work item = (b, kv head, split), split fastest. Split s covers the sequence's cache blocks
    [s * blocks_per_split, (s + 1) * blocks_per_split), walked BLOCK_N keys at a time. Without
    SPLIT (num_splits == 1) the result goes to o[B, Hq, D]; with it, row (b, h)'s partial (max and
    sum in log2 units, output normalised by its own sum) goes to mpart/lpart [B, Hq, num_splits]
    and opart [B, Hq, num_splits, D] (fp32). num_splits is a runtime value (it follows the table
    width, which grows step by step: a constexpr would compile a new kernel for each value).
    """
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    for item in range(pid, n_items, nprog):
        split = item % num_splits
        bh = item // num_splits
        kvh = bh % n_kv_heads
        b = bh // n_kv_heads
        ctx_len = tl.load(ctx_ptr + b)
        n_full = ctx_len // BLOCK_N  # tiles with every key in the context
        n_tiles = (ctx_len + BLOCK_N - 1) // BLOCK_N
        lo = split * blocks_per_split * TILES_PER_BLOCK
        hi = tl.minimum(lo + blocks_per_split * TILES_PER_BLOCK, n_tiles)
        full_hi = tl.minimum(hi, n_full)
        q, qt, qi, row_ok = load_query_tile(q_ptr, b, 1, kvh, stride_qb, stride_qh, group,
                                            G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_DT, DOT_DTYPE)
        # qpos = qi goes unused: decode needs no causal mask (its query is the last position)
        m_i, l_i, acc, acct = _attend_cache_tiles(
            q, qt, qi, ctx_len, lo, full_hi, hi, bt_ptr + b * stride_btb,
            kc_ptr + kvh * stride_kch, vc_ptr + kvh * stride_vch, stride_kcb, stride_vcb, stride_kcs, stride_vcs,
            qk_scale, False, TILES_PER_BLOCK, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_DT, HEAD_DIM, DOT_DTYPE)
        if not SPLIT:
            store_query_tile(o_ptr, acc, acct, l_i, b, row_ok, kvh, stride_ob, stride_oh, group,
                             G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_DT)
        else:
            # An empty split (past the end of a short sequence) writes m = -inf, l = 0, o = 0.
            denom = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            # Partials of rows (b, kvh * group + r % G_PAD): an int64 base for the group's first
            # head, int32 offsets for the rows (as load_query_tile does).
            first = (tl.cast(b, tl.int64) * n_q_heads + kvh * group) * num_splits + split
            part_row = (rows % G_PAD) * num_splits  # [BLOCK_M]
            tl.store(mpart_ptr + first + part_row, m_i, mask=row_ok)
            tl.store(lpart_ptr + first + part_row, l_i, mask=row_ok)
            o_rows = opart_ptr + first * HEAD_DIM + part_row[:, None] * HEAD_DIM  # [BLOCK_M, 1]
            offs_d = tl.arange(0, BLOCK_D)
            tl.store(o_rows + offs_d[None, :], acc / denom, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
            if BLOCK_DT > 0:
                offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
                tl.store(o_rows + offs_t[None, :], acct / denom,
                         mask=row_ok[:, None] & (offs_t < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["n_rows", "num_splits", "n_q_heads"])
def _split_reduce_kernel(
    mpart_ptr, lpart_ptr, opart_ptr, o_ptr, n_rows, num_splits, n_q_heads, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o[b, h] = sum_s w_s * opart[b, h, s] / sum_s w_s with w_s = lpart_s * 2^(mpart_s - max_s mpart).

    Row (b, h) per loop step. The splits are read CHUNK at a time (one pass for the max, one for
    the weighted sum), which bounds the tile and keeps num_splits a runtime value.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for row in range(pid, n_rows, nprog):
        base = tl.cast(row, tl.int64) * num_splits
        m_run = tl.full([CHUNK], float("-inf"), tl.float32)
        for c0 in range(0, num_splits, CHUNK):
            m_c = tl.load(mpart_ptr + base + c0 + offs_c, mask=c0 + offs_c < num_splits, other=float("-inf"))
            m_run = tl.maximum(m_run, m_c)
        m_max = tl.max(m_run, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.zeros([BLOCK_D], tl.float32)
        w_sum = tl.zeros([CHUNK], tl.float32)
        for c0 in range(0, num_splits, CHUNK):
            s_ok = c0 + offs_c < num_splits
            m_c = tl.load(mpart_ptr + base + c0 + offs_c, mask=s_ok, other=float("-inf"))
            l_c = tl.load(lpart_ptr + base + c0 + offs_c, mask=s_ok, other=0.0)
            w = l_c * tl.exp2(m_c - m_max)  # [CHUNK]; 0 for empty splits
            o_c = tl.load(opart_ptr + (base + c0 + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
                          mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            total += tl.sum(w[:, None] * o_c, 0)
            w_sum += w
        denom = tl.sum(w_sum, 0)
        out = total / tl.where(denom == 0.0, 1.0, denom)
        b = row // n_q_heads
        h = row - b * n_q_heads
        tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["n_work_rows", "n_kv_heads", "group", "stride_btb"])
def _paged_prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, cu_q_ptr, ctx_ptr, work_ptr, o_ptr,
    n_work_rows, n_kv_heads, group, qk_scale,
    stride_qt, stride_qh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_btb, stride_ot, stride_oh,
    G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """Queries of sequence b are its last q_len = cu_q[b+1] - cu_q[b] cached tokens (positions
    ctx - q_len .. ctx - 1); each attends causally to cached keys 0 .. its position.

    work_ptr: int32 [n_work_rows, 2] = (sequence, first query of the block), -1 = padding row.
    Work item = (work row, kv head). The keys are walked BLOCK_N at a time (BLOCK_SIZE / BLOCK_N
    pieces per cache block): tiles entirely at or below the tile's first position run unmasked,
    the rest (up to the last query's position) masked.
    """
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N
    for item in range(tl.program_id(0), n_work_rows * n_kv_heads, tl.num_programs(0)):
        seq, m0, kvh = work_item(work_ptr, item, n_kv_heads)
        if seq >= 0:
            q, qt, qi, row_ok, q_start, q_len, n_q = load_work_query(q_ptr, cu_q_ptr, seq, m0, kvh,
                                                                     stride_qt, stride_qh, group, G_PAD, HEAD_DIM,
                                                                     BLOCK_Q, BLOCK_M, BLOCK_D, BLOCK_DT, DOT_DTYPE)
            ctx_len = tl.load(ctx_ptr + seq)
            first = ctx_len - q_len + m0  # cache position of the tile's first query
            n_full = (first + 1) // BLOCK_N
            n_tiles = (first + n_q + BLOCK_N - 1) // BLOCK_N
            m_i, l_i, acc, acct = _attend_cache_tiles(
                q, qt, first + qi, ctx_len, 0, n_full, n_tiles, bt_ptr + seq * stride_btb,
                kc_ptr + kvh * stride_kch, vc_ptr + kvh * stride_vch, stride_kcb, stride_vcb, stride_kcs, stride_vcs,
                qk_scale, True, TILES_PER_BLOCK, BLOCK_N, BLOCK_M, BLOCK_D, BLOCK_DT, HEAD_DIM, DOT_DTYPE)
            store_query_tile(o_ptr, acc, acct, l_i, q_start + m0, row_ok, kvh, stride_ot, stride_oh, group,
                             G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_DT)


# --------------------------------------------------------------------------------------------
# References (the CPU path): gather each sequence's K/V through its table, fp32 SDPA
# --------------------------------------------------------------------------------------------


def _gather_kv(cache: torch.Tensor, table_row: torch.Tensor, n: int) -> torch.Tensor:
    """The first n cached tokens of one sequence: [n, Hk, D]."""
    block_size = cache.shape[1]
    blocks = table_row[: triton.cdiv(n, block_size)].long()
    rows = cache.reshape(cache.shape[0], -1).index_select(0, blocks)  # [nb, BS * Hk * D]
    return rows.view(-1, *cache.shape[2:])[:n]  # [n, Hk, D]


def _decode_sdpa(q: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, block_size: int, width: int, scale: float) -> torch.Tensor:
    """One SDPA call of decode queries q [n, Hq, D] over their first `width` cached tokens (tables
    [n, >= ceil(width / block_size)] int, lens [n] int64: tokens past a sequence's length are
    masked) in the flattened cache rows k_rows / v_rows [NB * BS, Hk * D] -> [n, Hq, D]. The query
    heads of each kv head go in as that head's queries, so K/V are not repeated."""
    n, hq, d = q.shape
    hk = k_rows.shape[1] // d
    pos = torch.arange(width, device=q.device)  # [L]
    valid = pos < lens[:, None]  # [n, L]
    blocks = tables.long().gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1).expand(n, -1))
    # Padding reads the sequence's first token (always written): a masked score times a finite V
    # adds 0, where an unwritten slot could hold NaN and 0 * NaN is NaN.
    slots = torch.where(valid, blocks * block_size + pos % block_size, blocks[:, :1] * block_size)
    # index_select over [rows, Hk * D] views: on the CPU 9x faster than advanced indexing.
    k, v = (rows.index_select(0, slots.flatten()).view(n, width, hk, d).transpose(1, 2)
            for rows in (k_rows, v_rows))  # [n, Hk, L, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(n, hk, hq // hk, d), k, v, attn_mask=valid[:, None, None, :], scale=scale)  # [n, Hk, G, D]
    return out.reshape(n, hq, d)


def _paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """PyTorch reference of paged decode: each sequence's K/V gathered through its table into
    [n, Hk, L, D] (the slots past its context masked) and attended by SDPA.

    On the CPU (its own path, where reading a length costs nothing) the sequences go shortest
    first in batches of about REFERENCE_DECODE_ELEMS gathered K elements, each batch as wide as its
    longest context: at batch 32 with contexts of 120-576 tokens that gathers ~40% fewer slots than
    the table's width, and a 4 MB batch is still in the cache when SDPA reads it (and the next one
    reuses its buffers; glibc hands larger ones back to the OS, which page-faults them in again on
    every call). Elsewhere, and under torch.compile, one call as wide as the table: no value is
    read on the host (no device sync) and the traced graph does not depend on the lengths.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b, hq, d = q.shape
    nb, bs, hk, _ = k_cache.shape
    lens = context_lens.to(torch.int64)
    rows = k_cache.reshape(nb * bs, hk * d), v_cache.reshape(nb * bs, hk * d)
    if torch.compiler.is_compiling() or q.device.type != "cpu" or b == 0:
        return _decode_sdpa(q, *rows, block_tables, lens, bs, block_tables.shape[1] * bs, scale)
    host = lens.tolist()
    order = sorted(range(b), key=host.__getitem__)
    out = torch.empty_like(q)
    first = 0
    while first < b:
        last = first + 1  # grow the batch while its gathered K (n x its longest context) stays in budget
        while last < b and (last + 1 - first) * host[order[last]] * hk * d <= REFERENCE_DECODE_ELEMS:
            last += 1
        width = max(1, host[order[last - 1]])
        index = torch.tensor(order[first:last], device=q.device)
        out.index_copy_(0, index, _decode_sdpa(q.index_select(0, index), *rows, block_tables.index_select(0, index),
                                               lens.index_select(0, index), bs, width, scale))
        first = last
    return out


def _paged_prefill_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                       block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                       context_lens: torch.Tensor,
                                       scale: float | None = None) -> torch.Tensor:
    """PyTorch reference of paged prefill: per sequence, gather its K/V and attend (SDPA) with the
    causal mask aligned to the end of the context (query i sits at ctx - q_len + i)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for b, n in enumerate(context_lens.tolist()):
        s, e = bounds[b], bounds[b + 1]
        if e > s:
            k, v = _gather_kv(k_cache, block_tables[b], n), _gather_kv(v_cache, block_tables[b], n)
            out[s:e] = attention_reference(q[s:e], k, v, scale, n - (e - s))
    return out


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(Hk, group, G_PAD) after checking the caches against q."""
    if k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1]:
        raise ValueError(f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} "
                         f"do not match q {tuple(q.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head dim must be contiguous")
    _, block_size, hk, _ = k_cache.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size} must be a power of two >= 16")
    group, g_pad = group_pad(q.shape[1], hk)
    return hk, group, g_pad


def cache_key_tile(block_size: int, plan: AttentionPlan) -> int:
    """Keys scored at once (BLOCK_N): the whole cache block, or pieces of a larger one as the
    launch's plan says (a 128-slot block as one tile overflows Ascend's UB and spills on CUDA)."""
    return min(block_size, plan.key_tile)


def decode_splits(batch: int, n_kv_heads: int, table_blocks: int, block_size: int, target: Target) -> int:
    """Splits per sequence for flash-decoding: enough (sequence, kv head, split) items to give
    each core's programs one, but no split shorter than MIN_SPLIT_TOKENS and at most MAX_SPLITS."""
    programs = target.cores(Work.ATTENTION) * target.programs_per_core[Work.ATTENTION]
    wanted = triton.cdiv(programs, max(batch * n_kv_heads, 1))
    most = triton.cdiv(table_blocks, max(1, MIN_SPLIT_TOKENS // block_size))
    return max(1, min(wanted, most, MAX_SPLITS))


def _paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float | None, num_splits: int | None) -> torch.Tensor:
    """The decode launch; num_splits=None picks it with decode_splits (tests force values)."""
    batch, hq, d = q.shape
    hk, group, g_pad = _check_cache(q, k_cache, v_cache)
    block_size = k_cache.shape[1]
    target = current_target(q.device)
    out = _backend.empty_output(q.shape, q.dtype, q.device)
    if batch == 0:
        return out
    q = _backend.last_dim_contiguous(q)
    tables = _backend.last_dim_contiguous(block_tables)  # the kernels step along a row
    block_d, block_dt = head_dim_blocks(d)
    block_m = max(16, g_pad)  # one query x G_PAD heads, padded to tl.dot's 16-row minimum
    table_blocks = block_tables.shape[1]
    plan = target.attention_plan("paged_decode", d, batch)
    if num_splits is None:
        num_splits = decode_splits(batch, hk, table_blocks, block_size, target)
    blocks_per_split = triton.cdiv(max(table_blocks, 1), num_splits)
    num_splits = triton.cdiv(max(table_blocks, 1), blocks_per_split)  # no split left always empty
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if num_splits > 1:
        mpart = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
        lpart = torch.empty_like(mpart)
        opart = torch.empty((batch, hq, num_splits, d), dtype=torch.float32, device=q.device)
    else:
        mpart = lpart = opart = out  # unused by the kernel
    n_items = batch * hk * num_splits
    grid = (target.grid(n_items, Work.ATTENTION),)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, tables, context_lens.contiguous(),
        out, mpart, lpart, opart,
        n_items, num_splits, blocks_per_split, hq, hk, group, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
        out.stride(0), out.stride(1),
        G_PAD=g_pad, SPLIT=num_splits > 1, HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_N=cache_key_tile(block_size, plan), BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DT=block_dt,
        DOT_DTYPE=target.dot_dtype(q.dtype), **target.attention_options(block_m, block_d + block_dt, plan),
    )
    if num_splits > 1:
        n_rows = batch * hq
        _split_reduce_kernel[(target.grid(n_rows, Work.ROWS),)](
            mpart, lpart, opart, out, n_rows, num_splits, hq, out.stride(0), out.stride(1),
            HEAD_DIM=d, CHUNK=REDUCE_CHUNK, BLOCK_D=max(16, triton.next_power_of_2(d)),
        )
    return out


@_backend.op(reference=_paged_attention_reference)
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Decode attention: one query per sequence against its paged KV cache.

    q: [B, Hq, D] fp32/fp16/bf16 (the new token's queries; its K/V already written to the cache).
    k_cache, v_cache: [NB, BS, Hk, D] (BS a power of two >= 16, head dim contiguous).
    block_tables: [B, max_blocks] int32 (copied when its column stride is not 1).
    context_lens: [B] int32 >= 1, cached tokens per sequence including the new one.
    scale: default 1/sqrt(D). Returns [B, Hq, D] in q's dtype.
    Splits are sized from block_tables.shape[1]: no host sync.
    """
    return _paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, None)


@_backend.op(reference=_paged_prefill_attention_reference)
def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            context_lens: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Prefill attention through the paged cache (prefix caching, chunked prefill).

    q: [T, Hq, D] packed queries; sequence b's are q[cu_seqlens_q[b]:cu_seqlens_q[b+1]], its last
    q_len cached tokens (already written), at positions context_lens[b] - q_len .. context_lens[b]-1.
    k_cache, v_cache: [NB, BS, Hk, D]; block_tables: [B, max_blocks] int32;
    cu_seqlens_q: [B+1] int32; context_lens: [B] int32 (>= each sequence's q_len).
    Each query attends causally to cached keys 0 .. its position. Returns [T, Hq, D] in q's dtype.
    No host sync: tiles and the work table are sized from T and B.
    """
    t, hq, d = q.shape
    hk, group, g_pad = _check_cache(q, k_cache, v_cache)
    out = _backend.empty_output(q.shape, q.dtype, q.device)
    n_seq = cu_seqlens_q.numel() - 1
    if t == 0 or n_seq <= 0:
        return out
    q = _backend.last_dim_contiguous(q)
    tables = _backend.last_dim_contiguous(block_tables)  # the kernels step along a row
    block_d, block_dt = head_dim_blocks(d)
    # 64 rows per tile (e.g. 8 queries x 8 padded heads of a 7-head group); queries per tile
    # capped by T, the only bound on a sequence's new tokens known without a sync.
    target = current_target(q.device)
    plan = target.attention_plan("paged_prefill", d, t)
    block_q, block_m = query_tile(g_pad, t, plan.query_rows)
    block_size = k_cache.shape[1]
    n_rows = rows_bound(t, n_seq, t, block_q)
    cu_seqlens_q = cu_seqlens_q.to(q.device, torch.int32)
    table = query_block_table(cu_seqlens_q, block_q, n_rows)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    grid = (target.grid(n_rows * hk, Work.ATTENTION),)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, tables, cu_seqlens_q.contiguous(),
        context_lens.contiguous(), table, out,
        n_rows, hk, group, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), tables.stride(0),
        out.stride(0), out.stride(1),
        G_PAD=g_pad, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_N=cache_key_tile(block_size, plan), BLOCK_Q=block_q,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DT=block_dt, DOT_DTYPE=target.dot_dtype(q.dtype),
        **target.attention_options(block_m, block_d + block_dt, plan),
    )
    return out
