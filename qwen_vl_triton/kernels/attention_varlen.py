"""varlen_attention: softmax attention over packed variable-length sequences (ViT, window attention,
LLM prefill without a cache), flash-attention style.

Layout: q[T, Hq, D], k/v[T, Hk, D]; sequence b owns tokens cu_seqlens[b]:cu_seqlens[b+1] and
attends only within itself (bidirectional, or causal with both ends aligned at its first token).

Kernel design
- Online softmax over BLOCK_N-key tiles: the [T, T] score matrix is never built; each program
  keeps a [BLOCK_M, D] fp32 accumulator and running max / sum per row.
- GQA: one work item is (query block, kv head), its tile the GQA layout of kernels/attention_common.py
  (BLOCK_Q queries x G_PAD query heads of that kv head), so each K/V tile is loaded once for the
  whole group (Qwen2.5-VL LLM: 7 query heads per kv head). Without GQA (ViT) G_PAD = 1 and a tile
  is BLOCK_M queries.
- Persistent grid: about one program per cube core (SM on CUDA) looping over the work items.
  The launcher builds a small int32 table of (sequence, first query) per query block from
  cu_seqlens on the device (no host sync); its length is a static bound, padding rows hold -1.
- Causal: key tiles entirely at or below every row's position run without a mask; only the
  diagonal tiles (and the tail of the sequence) pay for the mask.
- Head dims that are not a power of two run as two column tiles (head_dim_blocks: the ViT's 80 as
  64 + 16), so the dots do the head dim's work, not its next power of two's.
- tl.dot operands in the launcher's DOT_DTYPE (the input dtype on a device, fp32 in the
  interpreter, which computes bf16 dots wrongly), fp32 accumulation, exp2 with the scale folded
  into log2 units.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend, attention_common
from qwen_vl_triton.kernels.attention_common import (
    attend_kv_tile,
    empty_accumulators,
    kv_tiles_offsets,
    load_work_query,
    store_query_tile,
    work_item,
)
from qwen_vl_triton.kernels.target import Work, current_target

# The reference's SDPA calls: up to this many tokens of equal-length sequences each (16 ViT windows).
REFERENCE_GROUP_TOKENS = 1024


@triton.jit(do_not_specialize=["n_work_rows", "n_kv_heads", "group"])
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, work_ptr,
    n_work_rows, n_kv_heads, group, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """o[t, h] = softmax(q[t, h] . k[seq, h // group]^T * scale) v[seq, h // group] per sequence.

    work_ptr: int32 [n_work_rows, 2] = (sequence, first query of the block), sequence -1 = padding.
    Work item = (work row, kv head); each program loops over items pid, pid + nprog, ...
    The head dim is BLOCK_D columns and, with BLOCK_DT > 0, a tail tile (head_dim_blocks).
    """
    TAIL: tl.constexpr = BLOCK_DT > 0
    d_ok, k_off, v_off, dt_ok, kt_off, vt_off = kv_tiles_offsets(stride_kt, stride_vt, BLOCK_N, BLOCK_D, BLOCK_DT,
                                                                 HEAD_DIM)
    for item in range(tl.program_id(0), n_work_rows * n_kv_heads, tl.num_programs(0)):
        seq, m0, kvh = work_item(work_ptr, item, n_kv_heads)
        if seq >= 0:
            q, qt, qi, row_ok, start, seqlen, n_q = load_work_query(q_ptr, cu_ptr, seq, m0, kvh, stride_qt,
                                                                    stride_qh, group, G_PAD, HEAD_DIM, BLOCK_Q,
                                                                    BLOCK_M, BLOCK_D, BLOCK_DT, DOT_DTYPE)
            qpos = m0 + qi  # position of each row within its sequence
            k_base = k_ptr + start.to(tl.int64) * stride_kt + kvh * stride_kh
            v_base = v_ptr + start.to(tl.int64) * stride_vt + kvh * stride_vh
            m_i, l_i, acc, acct = empty_accumulators(BLOCK_M, BLOCK_D, BLOCK_DT)
            if CAUSAL:
                # keys <= m0 are visible to every row; keys beyond the last row's position to none
                n_full = tl.minimum(m0 + 1, seqlen) // BLOCK_N * BLOCK_N
                n_end = m0 + n_q
            else:
                n_full = seqlen // BLOCK_N * BLOCK_N
                n_end = seqlen
            for n0 in range(0, n_full, BLOCK_N):
                m_i, l_i, acc, acct = attend_kv_tile(
                    q, qt, k_base + n0 * stride_kt, v_base + n0 * stride_vt, k_off, v_off, kt_off, vt_off, d_ok,
                    dt_ok, n0, seqlen, qpos, qk_scale, m_i, l_i, acc, acct, False, CAUSAL, BLOCK_N, DOT_DTYPE, TAIL)
            for n0 in range(n_full, n_end, BLOCK_N):
                m_i, l_i, acc, acct = attend_kv_tile(
                    q, qt, k_base + n0 * stride_kt, v_base + n0 * stride_vt, k_off, v_off, kt_off, vt_off, d_ok,
                    dt_ok, n0, seqlen, qpos, qk_scale, m_i, l_i, acc, acct, True, CAUSAL, BLOCK_N, DOT_DTYPE, TAIL)
            store_query_tile(o_ptr, acc, acct, l_i, start + m0, row_ok, kvh, stride_ot, stride_oh, group,
                             G_PAD, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_DT)


def _varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                max_seqlen: int, causal: bool = False,
                                scale: float | None = None) -> torch.Tensor:
    """PyTorch reference: sequences of equal length L attend together, up to REFERENCE_GROUP_TOKENS
    tokens per SDPA call, as 4D [m, H, L, D] inputs (only 4D inputs take SDPA's flash kernel on the
    CPU), exact: no padding, no mask. A ViT's windows come in a few lengths (mostly 64 patches):
    one call per 16 windows instead of one each, 1.2x over per-window calls on 2 CPU cores."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    starts_by_len: dict[int, list[int]] = {}
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e > s:
            starts_by_len.setdefault(e - s, []).append(s)
    for n, starts in starts_by_len.items():
        step = max(1, REFERENCE_GROUP_TOKENS // n)
        for i in range(0, len(starts), step):
            group = starts[i : i + step]
            m = len(group)
            if group[-1] - group[0] == (m - 1) * n:  # back to back (one sequence, a run of windows): no copies
                rows = slice(group[0], group[0] + m * n)
                qg, kg, vg = q[rows], k[rows], v[rows]
            else:
                rows = (torch.tensor(group, device=q.device)[:, None] + torch.arange(n, device=q.device)).flatten()
                qg, kg, vg = (x.index_select(0, rows) for x in (q, k, v))  # [m * n, H, D]
            o = torch.nn.functional.scaled_dot_product_attention(
                *(x.unflatten(0, (m, n)).transpose(1, 2) for x in (qg, kg, vg)), is_causal=causal, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)  # [m, n, Hq, D]
            if isinstance(rows, slice):
                out[rows].unflatten(0, (m, n)).copy_(o)
            else:
                out.index_copy_(0, rows, o.flatten(0, 1))
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
    group, g_pad = attention_common.group_pad(hq, hk)
    block_d, block_dt = attention_common.head_dim_blocks(d)
    q, k, v = (_backend.last_dim_contiguous(x) for x in (q, k, v))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    # The device's plan (kernels/plans.py), by default 64-row tiles (target.query_rows): a window
    # of Qwen2.5-VL's ViT (<= 64 patches) is one tile.
    target = current_target(q.device)
    plan = target.attention_plan("varlen", d, max_seqlen)
    block_q, block_m = attention_common.query_tile(g_pad, max_seqlen, plan.query_rows)
    block_n = min(plan.key_tile, max(16, triton.next_power_of_2(max(max_seqlen, 1))))
    n_rows = attention_common.rows_bound(t, n_seq, max_seqlen, block_q)
    table = attention_common.query_block_table(cu_seqlens.to(q.device), block_q, n_rows)
    grid = (target.grid(n_rows * hk, Work.ATTENTION),)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens.to(q.device, torch.int32), table, n_rows, hk, group, scale * attention_common.LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        G_PAD=g_pad, HEAD_DIM=d, CAUSAL=bool(causal), BLOCK_Q=block_q,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DT=block_dt, DOT_DTYPE=target.dot_dtype(q.dtype),
        **target.attention_options(block_m, block_d + block_dt, plan),
    )
    return out
