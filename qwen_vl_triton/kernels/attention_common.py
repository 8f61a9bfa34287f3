"""What the attention kernels share: the Triton helpers of the GQA query tile and the online
softmax step, the launchers' tile and work-table planning, and the per-sequence SDPA reference.

Used by kernels/attention_varlen.py (packed sequences) and kernels/attention_paged.py (the paged
KV cache). Both lay a query tile out the same way: BLOCK_M rows = BLOCK_Q queries x G_PAD query
heads of one kv head (row r = query r // G_PAD, head r % G_PAD), so each K/V tile is loaded once
for a whole GQA group and the scores are one [BLOCK_M, D] x [D, BLOCK_N] tl.dot. Prefill kernels
walk a work table of (sequence, first query) rows built on the device by query_block_table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels exponentiate with exp2: scores are scaled into log2 units


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def attend_kv_tile(q, qt, k_tile, v_tile, k_off, v_off, kt_off, vt_off, d_ok, dt_ok, n0, n_keys, qpos, qk_scale,
                   m_i, l_i, acc, acct, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, TAIL: tl.constexpr):
    """One flash-attention step: attend query tile q [M, BLOCK_D] (DOT_DTYPE) to the keys at
    positions n0 .. n0 + BLOCK_N - 1, whose K/V rows start at k_tile / v_tile (k_off / v_off
    [BLOCK_N, BLOCK_D]: the rows' offsets, kv_tile_offsets).

    TAIL: the head dim is two column tiles (head_dim_blocks): q holds the first BLOCK_D columns
    and qt [M, BLOCK_DT] the rest, with kt_off / vt_off and dt_ok their K/V offsets and column
    mask; the scores are the sum of the two dots and the output's columns accumulate in acc and
    acct [M, BLOCK_DT] fp32. Without TAIL, qt, kt_off, vt_off, dt_ok and acct are unused.
    MASKED: keys at positions >= n_keys are neither loaded (so stale or NaN cache slots never reach
    the sums) nor attended, and with CAUSAL each row sees only keys <= its position qpos [M].
    Unmasked tiles must be fully visible to every row. d_ok [BLOCK_D] masks the head-dim padding.
    m_i, l_i [M]: running max / sum in log2 units; acc [M, BLOCK_D] fp32, unnormalised.
    Returns the updated (m_i, l_i, acc, acct).
    """
    if MASKED:
        key_pos = n0 + tl.arange(0, BLOCK_N)
        key_ok = key_pos < n_keys
        kv_mask = key_ok[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(k_tile + k_off, mask=kv_mask, other=0.0)
    v = tl.load(v_tile + v_off, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee")  # [M, BLOCK_N] fp32
    if TAIL:
        tail_mask = key_ok[:, None] & dt_ok[None, :] if MASKED else dt_ok[None, :]
        kt = tl.load(k_tile + kt_off, mask=tail_mask, other=0.0)
        vt = tl.load(v_tile + vt_off, mask=tail_mask, other=0.0)
        s += tl.dot(qt, tl.trans(kt.to(DOT_DTYPE)), input_precision="ieee")
    s = s * qk_scale
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
    if TAIL:
        acct = acct * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt.to(DOT_DTYPE), input_precision="ieee")
    return m_new, l_i, acc, acct


@triton.jit
def kv_tile_offsets(stride_kn, stride_vn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr):
    """Offsets of a K/V tile's BLOCK_N rows (row strides stride_kn / stride_vn) and BLOCK_D head-dim
    columns from column D0, computed once per program: the key loop then only moves a base
    pointer (cheaper on every backend, and the interpreter checks each int32 op). Returns (d_ok,
    k_off, v_off)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = D0 + tl.arange(0, BLOCK_D)
    k_off = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_off = offs_n[:, None] * stride_vn + offs_d[None, :]
    return offs_d < HEAD_DIM, k_off, v_off


@triton.jit
def kv_tiles_offsets(stride_kn, stride_vn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DT: tl.constexpr, HEAD_DIM: tl.constexpr):
    """kv_tile_offsets of the head dim's first column tile and, with a tail (BLOCK_DT > 0), of the
    rest: (d_ok, k_off, v_off, dt_ok, kt_off, vt_off), the tail's the first's when there is none."""
    d_ok, k_off, v_off = kv_tile_offsets(stride_kn, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM, 0)
    if BLOCK_DT > 0:
        dt_ok, kt_off, vt_off = kv_tile_offsets(stride_kn, stride_vn, BLOCK_N, BLOCK_DT, HEAD_DIM, BLOCK_D)
    else:
        dt_ok, kt_off, vt_off = d_ok, k_off, v_off
    return d_ok, k_off, v_off, dt_ok, kt_off, vt_off


@triton.jit
def empty_accumulators(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr):
    """The online softmax's starting state: (m_i, l_i [BLOCK_M], acc [BLOCK_M, BLOCK_D], acct
    [BLOCK_M, BLOCK_DT] with a tail, else a 1-element stand-in that attend_kv_tile leaves alone)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acct = tl.zeros([BLOCK_M, BLOCK_DT], tl.float32) if BLOCK_DT > 0 else tl.zeros([1], tl.float32)
    return m_i, l_i, acc, acct


@triton.jit
def load_query_tile(q_ptr, tok0, n_q, kvh, stride_qt, stride_qh, group,
                    G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """The [BLOCK_M, BLOCK_D] query tile of kv head `kvh`: row r is query token tok0 + r // G_PAD
    (valid while r // G_PAD < n_q) of query head kvh * group + r % G_PAD. Padding rows/cols load 0.
    With a tail (BLOCK_DT > 0) also the [BLOCK_M, BLOCK_DT] tile of columns BLOCK_D .. HEAD_DIM - 1.
    Returns (tile in DOT_DTYPE, tail tile (the tile itself without a tail), row index within the
    block r // G_PAD, row-valid mask)."""
    rows = tl.arange(0, BLOCK_M)
    qi = rows // G_PAD
    g = rows % G_PAD
    row_ok = (qi < n_q) & (g < group)
    # The tile's first token in int64 (T * Hq * D can pass 2^31 elements for long prompts), the
    # rows within it in int32: a [BLOCK_M, BLOCK_D] int64 offset tile would cost 64 KB of
    # Ascend's unified buffer at 64 x 128 (and int64 vector math is slow there).
    base = q_ptr + tl.cast(tok0, tl.int64) * stride_qt + kvh * group * stride_qh
    row_off = qi * stride_qt + g * stride_qh
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(base + row_off[:, None] + offs_d[None, :], mask=mask, other=0.0).to(DOT_DTYPE)
    if BLOCK_DT > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        mask_t = row_ok[:, None] & (offs_t < HEAD_DIM)[None, :]
        qt = tl.load(base + row_off[:, None] + offs_t[None, :], mask=mask_t, other=0.0).to(DOT_DTYPE)
    else:
        qt = q
    return q, qt, qi, row_ok


@triton.jit
def work_item(work_ptr, item, n_kv_heads):
    """Work item `item` = (work row, kv head) over a query_block_table, kv head fastest.
    Returns (seq, m0, kvh): the row's sequence (-1 for a padding row) and first query."""
    wrow = item // n_kv_heads
    seq = tl.load(work_ptr + 2 * wrow)
    m0 = tl.load(work_ptr + 2 * wrow + 1)
    return seq, m0, item - wrow * n_kv_heads


@triton.jit
def load_work_query(q_ptr, cu_ptr, seq, m0, kvh, stride_qt, stride_qh, group,
                    G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
                    DOT_DTYPE: tl.constexpr):
    """The query block of a work item (seq >= 0, m0, kvh): queries m0 .. m0 + n_q - 1 of sequence
    seq, which owns tokens cu[seq] .. cu[seq + 1] - 1, as the load_query_tile of kv head kvh.
    Returns (q, qt, qi, row_ok, start, seq_len, n_q)."""
    start = tl.load(cu_ptr + seq)
    seq_len = tl.load(cu_ptr + seq + 1) - start
    n_q = tl.minimum(seq_len - m0, BLOCK_Q)
    q, qt, qi, row_ok = load_query_tile(q_ptr, start + m0, n_q, kvh, stride_qt, stride_qh, group,
                                        G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_DT, DOT_DTYPE)
    return q, qt, qi, row_ok, start, seq_len, n_q


@triton.jit
def store_query_tile(o_ptr, acc, acct, l_i, tok0, row_ok, kvh, stride_ot, stride_oh, group,
                     G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr):
    """Store acc / l_i (rows laid out as in load_query_tile; with a tail, acct / l_i in columns
    BLOCK_D ..) into o[T, Hq, D] in o's dtype."""
    rows = tl.arange(0, BLOCK_M)
    # Padding rows may have seen no key (l = 0): divide by 1 there, they are not stored anyway.
    denom = tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    base = o_ptr + tl.cast(tok0, tl.int64) * stride_ot + kvh * group * stride_oh  # int64 scalar, int32 rows
    o_off = (rows // G_PAD) * stride_ot + (rows % G_PAD) * stride_oh
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(base + o_off[:, None] + offs_d[None, :], (acc / denom).to(o_ptr.dtype.element_ty), mask=mask)
    if BLOCK_DT > 0:
        offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
        mask_t = row_ok[:, None] & (offs_t < HEAD_DIM)[None, :]
        tl.store(base + o_off[:, None] + offs_t[None, :], (acct / denom).to(o_ptr.dtype.element_ty), mask=mask_t)


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


def head_dim_blocks(d: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DT): the column tiles of head dim d. One power-of-two tile (BLOCK_DT = 0, its
    padding masked) unless two cover d with less padding: then the largest power of two below d
    and a tail of the next power of two (>= 16, tl.dot's least) over the rest. The ViT's 80 is
    64 + 16: its dots do 80 columns' work where one padded tile would do 128's (37% of it wasted)."""
    if d > 256:
        raise ValueError(f"head dim {d} > 256 is not supported by the attention kernels")
    whole = max(16, triton.next_power_of_2(d))
    if d <= 16 or d == whole:
        return whole, 0
    first = whole // 2
    tail = max(16, triton.next_power_of_2(d - first))
    return (first, tail) if first + tail < whole else (whole, 0)


# --------------------------------------------------------------------------------------------
# Reference
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
