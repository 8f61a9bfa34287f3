"""write_kv_cache: scatter the new tokens' keys and values into the paged KV cache.

Cache layout: [NB, BS, Hk, D] (block, slot in block, kv head, head dim); token t goes to
block slot_mapping[t] // BS, row slot_mapping[t] % BS. A negative slot (padding) writes nothing.

Kernel design: a persistent grid of about the vector-core count; each program loops over tokens
and copies the token's whole [Hk, D] row (one contiguous Hk*D run in a contiguous cache) for K and
V in one tile each. Slots are compared in int32 (int64 compares are scalarised on Ascend); cache
offsets are int64 because a cache can pass 2^31 elements (e.g. 40k blocks x 128 x 8 x 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.target import Work, current_target


# The token count follows the batch: not specialised, so no new compile per size.
@triton.jit(do_not_specialize=["n_tokens"])
def _write_kv_cache_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, n_tokens,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    HK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """k_cache[slot // BS, slot % BS] = k[t] (same for v) for every token t with slot >= 0."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < HK)[:, None] & (offs_d < HEAD_DIM)[None, :]
    for t in range(pid, n_tokens, nprog):
        # Slots fit int32 (a cache of 2^31 token slots is beyond any device), so the compare and
        # the block/offset split run in int32 whether slot_mapping is int32 or int64.
        slot = tl.load(slot_ptr + t).to(tl.int32)
        if slot >= 0:
            blk = slot // BLOCK_SIZE
            off = slot - blk * BLOCK_SIZE
            t64 = tl.cast(t, tl.int64)
            src_k = k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
            src_v = v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
            dst_k = (kc_ptr + blk.to(tl.int64) * stride_kcb + off * stride_kcs
                     + offs_h[:, None] * stride_kch + offs_d[None, :])
            dst_v = (vc_ptr + blk.to(tl.int64) * stride_vcb + off * stride_vcs
                     + offs_h[:, None] * stride_vch + offs_d[None, :])
            # No arithmetic on the values: a same-dtype write is a bit-exact copy.
            tl.store(dst_k, tl.load(src_k, mask=mask).to(kc_ptr.dtype.element_ty), mask=mask)
            tl.store(dst_v, tl.load(src_v, mask=mask).to(vc_ptr.dtype.element_ty), mask=mask)


def _write_kv_cache_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor) -> None:
    """PyTorch reference: index_copy_ of the kept tokens' rows into [slots, Hk * D] views of the
    caches (in place)."""
    keep = slot_mapping >= 0  # [T]
    slots = slot_mapping[keep].long()
    for new, cache in ((k, k_cache), (v, v_cache)):
        rows = new[keep].to(cache.dtype)  # [T_kept, Hk, D]
        cache.view(-1, rows.shape[1] * rows.shape[2]).index_copy_(0, slots, rows.reshape(rows.shape[0], -1))


@_backend.op(reference=_write_kv_cache_reference)
def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write new tokens' keys/values into the paged caches IN PLACE (returns None).

    k, v: [T, Hk, D] (any row/head strides; the head dim is made contiguous).
    k_cache, v_cache: [NB, BS, Hk, D], modified in place; the head dim must be contiguous.
    slot_mapping: [T] int32 or int64, slot = block * BS + row; slot < 0 skips the token (its
    cache rows stay untouched). Values are converted to the cache dtype (a bit-exact copy when the
    dtypes match).
    """
    n_tokens, hk, d = k.shape
    if k_cache.shape[2:] != (hk, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not hold k rows of shape {(hk, d)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("write_kv_cache writes in place: the caches' head dim must be contiguous")
    if n_tokens == 0:
        return None
    k, v = _backend.last_dim_contiguous(k), _backend.last_dim_contiguous(v)
    # Memory-bound copy (Work.COPY): on CUDA several programs per SM hide the loop's load latency.
    grid = (current_target(k.device).grid(n_tokens, Work.COPY),)
    _write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), n_tokens,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HK=hk, HEAD_DIM=d, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(hk), BLOCK_D=triton.next_power_of_2(d),
    )
    return None
