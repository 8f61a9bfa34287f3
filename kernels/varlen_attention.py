"""varlen_attention: softmax attention over packed variable-length sequences (ViT, window attention,
LLM prefill without a cache), flash-attention style.

Layout: q[T, Hq, D], k/v[T, Hk, D]; sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1] and
attends only within itself (bidirectional, or causal with both ends aligned at its first token).

Kernel design
- Online softmax over BLOCK_N-key tiles: the [T, T] score matrix is never built; each program
  keeps a [BLOCK_M, D] fp32 accumulator and running max / sum per row.
- GQA: one work item is (query block, kv head). Its BLOCK_M tile rows are BLOCK_Q queries x G_PAD
  query heads of that kv head (row r = query r // G_PAD, head r % G_PAD), so each K/V tile is loaded
  once for the whole group (Qwen2.5-VL LLM: 7 query heads per kv head) and the dot stays a plain
  [BLOCK_M, D] x [D, BLOCK_N] matmul. Without GQA (ViT) G_PAD = 1 and a tile is BLOCK_M queries.
- Persistent grid: about one program per cube core (SM on CUDA) looping over the work items.
  The launcher builds a small int32 table of (sequence, first query) per query block from
  cu_seqlens on the device (no host sync); its length is a static bound, padding rows hold -1.
- Causal: key tiles entirely at or below every row's position run without a mask; only the
  diagonal tiles (and the tail of the sequence) pay for the mask.
- tl.dot operands in the launcher's DOT_DTYPE (the input dtype on a device, fp32 in the
  interpreter, which computes bf16 dots wrongly), fp32 accumulation, exp2 with the scale folded
  into log2 units.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import _backend
from kernels.target import Work, current_target

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Shared Triton helpers (paged_attention.py uses them too)
# --------------------------------------------------------------------------------------------


@triton.jit
def _attend_kv_tile(q, k_ptrs, v_ptrs, d_ok, n0, n_keys, qpos, qk_scale, m_i, l_i, acc,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_DTYPE: tl.constexpr):
    """One flash-attention step: attend query tile q [M, BLOCK_D] (DOT_DTYPE) to the keys at
    positions n0 .. n0 + BLOCK_N - 1, whose K/V rows are at k_ptrs / v_ptrs [BLOCK_N, BLOCK_D].

    MASKED: keys at positions >= n_keys are neither loaded (so stale or NaN cache slots never reach
    the sums) nor attended, and with CAUSAL each row sees only keys <= its position qpos [M].
    Unmasked tiles must be fully visible to every row. d_ok [BLOCK_D] masks the head-dim padding.
    m_i, l_i [M]: running max / sum in log2 units; acc [M, BLOCK_D] fp32, unnormalised.
    Returns the updated (m_i, l_i, acc).
    """
    if MASKED:
        key_pos = n0 + tl.arange(0, BLOCK_N)
        key_ok = key_pos < n_keys
        kv_mask = key_ok[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee") * qk_scale  # [M, BLOCK_N] fp32
    if MASKED:
        valid = key_ok[None, :]
        if CAUSAL:
            valid = valid & (key_pos[None, :] <= qpos[:, None])
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf: exponentiate against 0 instead so that
    # (-inf) - (-inf) never makes a NaN (its p and alpha are 0 either way).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _kv_tile_offsets(stride_kn, stride_vn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
    """Offsets of a K/V tile's BLOCK_N rows (row strides stride_kn / stride_vn) and BLOCK_D head-dim
    columns, computed once per program: the key loop then only moves a base pointer (cheaper on
    every backend, and the interpreter checks each int32 op). Returns (d_ok, k_off, v_off)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_off = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_off = offs_n[:, None] * stride_vn + offs_d[None, :]
    return offs_d < HEAD_DIM, k_off, v_off


@triton.jit
def _load_query_tile(q_ptr, tok0, n_q, kvh, stride_qt, stride_qh, group,
                     G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The [BLOCK_M, BLOCK_D] query tile of kv head `kvh`: row r is query token tok0 + r // G_PAD
    (valid while r // G_PAD < n_q) of query head kvh * group + r % G_PAD. Padding rows/cols load 0.
    Returns (tile in DOT_DTYPE, row index within the block r // G_PAD, row-valid mask)."""
    rows = tl.arange(0, BLOCK_M)
    qi = rows // G_PAD
    g = rows % G_PAD
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (qi < n_q) & (g < group)
    # The tile's first token in int64 (T * Hq * D can pass 2^31 elements for long prompts), the
    # rows within it in int32: a [BLOCK_M, BLOCK_D] int64 offset tile would cost 64 KB of
    # Ascend's unified buffer at 64 x 128 (and int64 vector math is slow there).
    base = q_ptr + tl.cast(tok0, tl.int64) * stride_qt + kvh * group * stride_qh
    row_off = qi * stride_qt + g * stride_qh
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(base + row_off[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return q.to(DOT_DTYPE), qi, row_ok


@triton.jit
def _work_item(work_ptr, item, n_kv_heads):
    """Work item `item` = (work row, kv head) over a query_block_table, kv head fastest.
    Returns (seq, m0, kvh): the row's sequence (-1 for a padding row) and first query."""
    wrow = item // n_kv_heads
    seq = tl.load(work_ptr + 2 * wrow)
    m0 = tl.load(work_ptr + 2 * wrow + 1)
    return seq, m0, item - wrow * n_kv_heads


@triton.jit
def _load_work_query(q_ptr, cu_ptr, seq, m0, kvh, stride_qt, stride_qh, group,
                     G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The query block of a work item (seq >= 0, m0, kvh): queries m0 .. m0 + n_q - 1 of sequence
    seq, which owns tokens cu[seq] .. cu[seq + 1] - 1, as the _load_query_tile of kv head kvh.
    Returns (q, qi, row_ok, start, seq_len, n_q)."""
    start = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - start
    n_q = tl.minimum(seq_len - m0, BLOCK_Q)
    q, qi, row_ok = _load_query_tile(q_ptr, start + m0, n_q, kvh, stride_qt, stride_qh, group,
                                     G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_DTYPE)
    return q, qi, row_ok, start, seq_len, n_q


@triton.jit
def _store_query_tile(o_ptr, acc, l_i, tok0, row_ok, kvh, stride_ot, stride_oh, group,
                      G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store acc / l_i (rows laid out as in _load_query_tile) into o[T, Hq, D] in o's dtype."""
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # Padding rows may have seen no key (l = 0): divide by 1 there, they are not stored anyway.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    base = o_ptr + tl.cast(tok0, tl.int64) * stride_ot + kvh * group * stride_oh  # int64 scalar, int32 rows
    o_off = (rows // G_PAD) * stride_ot + (rows % G_PAD) * stride_oh
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(base + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# varlen kernel
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["n_work_rows", "n_kv_heads", "group"])
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, work_ptr,
    n_work_rows, n_kv_heads, group, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """o[t, h] = softmax(q[t, h] . k[seq, h // group]^T * scale) v[seq, h // group] per sequence.

    work_ptr: int32 [n_work_rows, 2] = (sequence, first query of the block), sequence -1 = padding.
    Work item = (work row, kv head); each program loops over items pid, pid + nprog, ...
    """
    d_ok, k_off, v_off = _kv_tile_offsets(stride_kt, stride_vt, BLOCK_N, BLOCK_D, HEAD_DIM)
    for item in range(tl.program_id(0), n_work_rows * n_kv_heads, tl.num_programs(0)):
        seq, m0, kvh = _work_item(work_ptr, item, n_kv_heads)
        if seq >= 0:
            q, qi, row_ok, start, seqlen, n_q = _load_work_query(q_ptr, cu_ptr, seq, m0, kvh, stride_qt, stride_qh,
                                                                 group, G_PAD, HEAD_DIM, BLOCK_Q, BLOCK_M,
                                                                 BLOCK_D, DOT_DTYPE)
            qpos = m0 + qi  # position of each row within its sequence
            k_base = k_ptr + start.to(tl.int64) * stride_kt + kvh * stride_kh
            v_base = v_ptr + start.to(tl.int64) * stride_vt + kvh * stride_vh
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            if CAUSAL:
                # keys <= m0 are visible to every row; keys beyond the last row's position to none
                n_full = tl.minimum(m0 + 1, seqlen) // BLOCK_N * BLOCK_N
                n_end = m0 + n_q
            else:
                n_full = seqlen // BLOCK_N * BLOCK_N
                n_end = seqlen
            for n0 in range(0, n_full, BLOCK_N):
                m_i, l_i, acc = _attend_kv_tile(q, k_base + n0 * stride_kt + k_off,
                                                v_base + n0 * stride_vt + v_off, d_ok, n0, seqlen, qpos,
                                                qk_scale, m_i, l_i, acc, False, CAUSAL, BLOCK_N, DOT_DTYPE)
            for n0 in range(n_full, n_end, BLOCK_N):
                m_i, l_i, acc = _attend_kv_tile(q, k_base + n0 * stride_kt + k_off,
                                                v_base + n0 * stride_vt + v_off, d_ok, n0, seqlen, qpos,
                                                qk_scale, m_i, l_i, acc, True, CAUSAL, BLOCK_N, DOT_DTYPE)
            _store_query_tile(o_ptr, acc, l_i, start + m0, row_ok, kvh, stride_ot, stride_oh, group,
                              G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D)


# --------------------------------------------------------------------------------------------
# Launcher helpers
# --------------------------------------------------------------------------------------------


def query_block_table(cu_seqlens: torch.Tensor, block_q: int, n_rows: int) -> torch.Tensor:
    """int32 [n_rows, 2] table of (sequence, first query index) for every BLOCK_Q-query block of
    every sequence, in order, padded with (-1, 0) rows up to the static bound `n_rows`.

    Built with a handful of device ops and no host sync: cu_seqlens stays on the device.
    """
    cu = cu_seqlens.to(torch.int64)
    n_seq = cu.numel() - 1
    lens = cu[1:] - cu[:-1]  # [B]
    n_blocks = (lens + block_q - 1) // block_q  # [B]
    ends = torch.cumsum(n_blocks, 0)  # [B] exclusive end of each sequence's rows
    j = torch.arange(n_rows, device=cu.device)  # [n_rows]
    seq = torch.searchsorted(ends, j, right=True)  # [n_rows], == B past the last block
    seq_c = seq.clamp(max=max(n_seq - 1, 0))
    first_q = (j - (ends[seq_c] - n_blocks[seq_c])) * block_q
    valid = seq < n_seq
    table = torch.stack([torch.where(valid, seq_c, -1), torch.where(valid, first_q, 0)], dim=1)
    return table.to(torch.int32).contiguous()


def rows_bound(total_tokens: int, n_seq: int, max_seqlen: int, block_q: int) -> int:
    """Static upper bound on the number of BLOCK_Q query blocks over all sequences."""
    return max(1, min(total_tokens // block_q + n_seq, n_seq * triton.cdiv(max(max_seqlen, 1), block_q)))


def group_pad(n_q_heads: int, n_kv_heads: int) -> tuple[int, int]:
    """(group, G_PAD): query heads per kv head and its power-of-two padding."""
    if n_q_heads % n_kv_heads:
        raise ValueError(f"query heads {n_q_heads} not a multiple of kv heads {n_kv_heads}")
    group = n_q_heads // n_kv_heads
    return group, triton.next_power_of_2(group)


def query_tile(g_pad: int, max_queries: int, target_rows: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): queries per tile and tile rows (BLOCK_Q * G_PAD, at least 16 for tl.dot),
    aiming at `target_rows` rows but no more queries than a sequence can have."""
    block_q = max(1, target_rows // g_pad)
    block_q = min(block_q, triton.next_power_of_2(max(max_queries, 1)))
    block_m = max(16, block_q * g_pad)
    return block_m // g_pad, block_m


def check_head_dim(d: int) -> int:
    """BLOCK_D for head dim d (next power of two; 80 pads to 128 and the tail is masked)."""
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the attention kernels")
    return max(16, triton.next_power_of_2(d))


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride on the head dim (the kernels address rows and heads by stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        causal_from: int | None) -> torch.Tensor:
    """Softmax attention of one sequence through PyTorch's SDPA: q [Lq, Hq, D], k/v [Lk, Hk, D]
    -> [Lq, Hq, D] in q's dtype (scores, softmax and sums in fp32 inside SDPA).

    causal_from: None = every query sees every key; else query i sits at position causal_from + i
    and sees keys 0..causal_from + i. The inputs go in as 4D [1, H, L, D] views: on the CPU
    (torch 2.13) only 4D inputs take SDPA's flash kernel, 3D ones fall back to the math path,
    which builds [H, Lq, Lk] scores and was 3x slower for a 1564-patch image.
    """
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    mask = None
    if causal_from is not None and (causal_from > 0 or lq != lk):
        mask = torch.arange(lk, device=q.device) <= torch.arange(causal_from, causal_from + lq,
                                                                 device=q.device)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=mask,
        is_causal=causal_from is not None and mask is None, scale=scale, enable_gqa=hq != hk)
    return out[0].transpose(0, 1)


def _varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, causal: bool = False,
                                scale: float | None = None) -> torch.Tensor:
    """PyTorch reference: SDPA per sequence."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e > s:
            out[s:e] = attention_reference(q[s:e], k[s:e], v[s:e], scale, 0 if causal else None)
    return out


@_backend.op(reference=_varlen_attention_reference)
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention over packed variable-length sequences.

    q: [T, Hq, D]; k, v: [T, Hk, D] (Hq % Hk == 0; query head h reads kv head h // (Hq // Hk));
    fp32/fp16/bf16, any row/head strides (head dim contiguous or copied so).
    cu_seqlens: [B+1] int32 prefix sums of the sequence lengths (on q's device).
    max_seqlen: the longest sequence (sizes tiles and the work table; no host sync here).
    causal: query i of a sequence sees its keys 0..i; otherwise all keys of its sequence.
    scale: softmax scale, default 1/sqrt(D).
    Returns [T, Hq, D] in q's dtype (math in fp32). Tokens outside cu_seqlens[0]:cu_seqlens[-1]
    are left unwritten.
    """
    t, hq, d = q.shape
    hk = k.shape[1]
    out = _backend.empty_output(q.shape, q.dtype, q.device)
    n_seq = cu_seqlens.numel() - 1
    if t == 0 or n_seq <= 0:
        return out
    group, g_pad = group_pad(hq, hk)
    block_d = check_head_dim(d)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # 64-row tiles (target.query_rows): a window of Qwen2.5-VL's ViT (<= 64 patches) is one tile.
    target = current_target(q.device)
    block_q, block_m = query_tile(g_pad, max_seqlen, target.query_rows)
    block_n = min(target.key_tile, max(16, triton.next_power_of_2(max(max_seqlen, 1))))
    n_rows = rows_bound(t, n_seq, max_seqlen, block_q)
    table = query_block_table(cu_seqlens.to(q.device), block_q, n_rows)
    grid = (target.grid(n_rows * hk, Work.ATTENTION),)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens.to(q.device, torch.int32), table, n_rows, hk, group, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        G_PAD=g_pad, HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_Q=block_q,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_DTYPE=target.dot_dtype(q.dtype),
        **target.attention_options(block_m, block_d),
    )
    return out
