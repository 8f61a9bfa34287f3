"""The vision tower (ViT + 2x2 patch merger) of Qwen2-VL and Qwen2.5-VL, as functions.

Input is the processor's flattened patches of any number of images and videos, packed:
pixel_values [N, C * tp * p * p] with grid_thw [n_items, 3] (t, h, w in patches per item).
Patches arrive in merge-window order (each 2x2 group of patches that becomes one LLM token is
contiguous), which is why the rotary positions below walk the grid in that order too.

Attention is packed per frame: every temporal slice of every item is its own sequence
(cu_seqlens from repeat_interleave(h * w, t)), so images of different sizes and all frames of a
video go through one varlen_attention call without attending to each other. Qwen2.5-VL also
attends within windows (window_size px square, in merged tokens) in all blocks but
fullatt_block_indexes: tokens are reordered window by window before the blocks and put back in
order after the merger.

Tensor parallelism (tp.world_size > 1; weights sharded by modeling.weights): each rank runs
num_heads / world heads (qkv column-parallel) and a balanced share of each MLP's features (fc1 /
gate_up column-, fc2 / down row-parallel) and of the merger MLP's; proj, fc2 and the merger's fc2 end in the
all-reduce written out below (their biases live on rank 0 only, so they are added once). Tokens,
norms and the patch embedding are replicated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_vl_triton import kernels
from qwen_vl_triton.modeling.config import VisionConfig
from qwen_vl_triton.modeling.weights import VisionBlockWeights, VisionWeights
from qwen_vl_triton.parallel.comm import all_reduce
from qwen_vl_triton.parallel.group import SINGLE_PROCESS, TPGroup

_NORM_EPS = 1e-6  # both towers hard-code eps 1e-6 for their block and merger norms


# ----------------------------------------------------------------------------- index helpers


def cu_seqlens_per_frame(grid_thw: torch.Tensor) -> torch.Tensor:
    """[n, 3] (t, h, w) -> [sum(t) + 1] int32 prefix sums of h * w, one sequence per frame."""
    seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))


def rotary_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates of every patch, in the processor's merge-window order.

    Returns [N, 2] int64. Within an item the patches run over merge x merge groups in raster
    order of groups, and within a group in raster order; frames repeat the same coordinates.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/m, m, w/m, m] -> [h/m, w/m, m, m]: group-major order
        hw = torch.stack([hh.transpose(1, 2).flatten(), ww.transpose(1, 2).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """2D rotary tables for kernels.apply_rope: [N, 2] (h, w) -> cos, sin [N, head_dim / 2] fp32.

    The first half of the rotated frequencies encodes h, the second w, each with the same
    head_dim / 4 inverse frequencies (transformers' axial vision rope).
    """
    exponents = torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=device) / (head_dim // 2)
    inv_freq = 1.0 / theta**exponents  # [D/4]
    freqs = positions.to(device=device, dtype=torch.float32)[:, :, None] * inv_freq  # [N, 2, D/4]
    freqs = freqs.flatten(1)  # [N, D/2]: h freqs then w freqs
    return freqs.cos(), freqs.sin()


def window_index(grid_thw: torch.Tensor, cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL window attention layout, in merged-token units.

    Returns (index [N / merge_unit] int64, cu_window_seqlens [n_windows + 1] int32):
    index[j] is the merged token placed j-th when tokens are grouped window by window (windows of
    window_size // merge // patch merged tokens square, per frame, raster order of windows, the
    last row/column of windows cut short); cu_window_seqlens counts patches per window.
    """
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    indices, seqlens, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        nh, nw = -(-gh // side), -(-gw // side)  # windows per column / row (ceil)
        grid = torch.arange(t * gh * gw).view(t, gh, gw)
        padded = F.pad(grid, (0, nw * side - gw, 0, nh * side - gh), value=-1)  # [t, nh*s, nw*s]
        windows = padded.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(-1, side * side)
        valid = windows >= 0
        indices.append(windows[valid] + offset)
        seqlens.append(valid.sum(1) * cfg.merge_unit)  # every window holds >= 1 token
        offset += t * gh * gw
    cu = F.pad(torch.cat(seqlens).cumsum(0, dtype=torch.int32), (1, 0))
    return torch.cat(indices), cu


# ----------------------------------------------------------------------------- blocks


def _norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm when the weights carry a bias (Qwen2-VL), else RMSNorm (Qwen2.5-VL)."""
    if bias is None:
        return kernels.rms_norm(x, weight, _NORM_EPS)
    return kernels.layer_norm(x, weight, bias, _NORM_EPS)


def _mlp(x: torch.Tensor, w: VisionBlockWeights, gated: bool, tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """[N, E] -> [N, E]: SiLU-gated (Qwen2.5-VL) or QuickGELU (Qwen2-VL) MLP (I: this rank's share)."""
    h = F.linear(x, w.fc1_weight, w.fc1_bias)  # [N, 2I] (gate | up) or [N, I]
    h = kernels.silu_and_mul(h) if gated else h * torch.sigmoid(1.702 * h)  # [N, I]
    return all_reduce(F.linear(h, w.fc2_weight, w.fc2_bias), tp)  # row-parallel fc2 / down: [N, E]


def vision_block(x: torch.Tensor, w: VisionBlockWeights, cfg: VisionConfig, cos: torch.Tensor,
                 sin: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                 tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """One pre-norm ViT block over packed tokens x [N, E] -> [N, E] (bidirectional attention
    within each cu_seqlens segment); `heads` below are this rank's num_heads / world."""
    n = x.shape[0]
    heads = cfg.num_heads // tp.world_size
    qkv = F.linear(_norm(x, w.norm1_weight, w.norm1_bias), w.qkv_weight, w.qkv_bias)
    qkv = qkv.view(n, 3, heads, cfg.head_dim)
    # q and k rotate as one [N, 2 heads, D] (strided) tensor: one launch instead of two.
    qk = kernels.apply_rope(qkv[:, :2].reshape(n, 2 * heads, cfg.head_dim), cos, sin)
    q, k = qk.view(n, 2, heads, cfg.head_dim).unbind(1)  # 2 x [N, heads, D]
    v = qkv[:, 2].contiguous()  # [N, heads, D]
    attn = kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen)  # [N, heads, D]
    x = x + all_reduce(F.linear(attn.reshape(n, -1), w.proj_weight, w.proj_bias), tp)  # row-parallel proj
    return x + _mlp(_norm(x, w.norm2_weight, w.norm2_bias), w, cfg.norm == "rmsnorm", tp)


def patch_merger(x: torch.Tensor, w: VisionWeights, cfg: VisionConfig, tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """[N, E] -> [N / merge_unit, out]: norm, concatenate each 2x2 group, MLP with exact GELU
    (fc1 column-, fc2 row-parallel)."""
    x = _norm(x, w.merger_norm_weight, w.merger_norm_bias).reshape(-1, cfg.merge_unit * cfg.hidden_size)
    x = F.gelu(F.linear(x, w.merger_fc1_weight, w.merger_fc1_bias))  # [N / merge_unit, this rank's share of 4E]
    return all_reduce(F.linear(x, w.merger_fc2_weight, w.merger_fc2_bias), tp)


# ----------------------------------------------------------------------------- the tower


def _max_len(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _by_window(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """Reorder rows of x [N, ...] in groups of `unit` (one merged token) by `index` [N / unit]."""
    return x.reshape(-1, unit, *x.shape[1:])[index].reshape(x.shape)


def vision_forward(w: VisionWeights, cfg: VisionConfig, pixel_values: torch.Tensor,
                   grid_thw: torch.Tensor, out_dtype: torch.dtype | None = None,
                   tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """Encode packed images/videos to LLM token embeddings.

    pixel_values: [N, C * tp * p * p] any float dtype (cast to the tower's weight dtype)
    grid_thw:     [n_items, 3] int (t, h, w in patches); N = sum(t * h * w)
    Returns [N / merge_unit, out_hidden_size] in out_dtype (default: the tower's dtype), items in
    input order. Going to fp16, values are clamped to its range first (the tower itself runs in
    bf16/fp32 for an fp16 model, see weights.vision_dtype_for). tp: the tensor-parallel group
    (every rank passes the same inputs and gets the same output).
    """
    dtype = w.patch_embed.dtype
    device = w.patch_embed.device
    grid_thw = grid_thw.cpu().long()
    if pixel_values.shape != (int(grid_thw.prod(-1).sum()), cfg.patch_dim):
        raise ValueError(f"pixel_values {list(pixel_values.shape)} do not match grid_thw "
                         f"{grid_thw.tolist()} (expected {cfg.patch_dim} values per patch)")
    x = F.linear(pixel_values.to(device=device, dtype=dtype), w.patch_embed)  # [N, E]
    cos, sin = rotary_cos_sin(rotary_positions(grid_thw, cfg.spatial_merge_size), cfg.head_dim,
                              cfg.rope_theta, device)  # [N, D/2] each
    cu_full = cu_seqlens_per_frame(grid_thw).to(device)
    cu_window, order = cu_full, None
    if cfg.window_size is not None:  # Qwen2.5-VL: group tokens window by window
        order, cu_window = window_index(grid_thw, cfg)
        order, cu_window = order.to(device), cu_window.to(device)
        x = _by_window(x, order, cfg.merge_unit)
        cos, sin = _by_window(cos, order, cfg.merge_unit), _by_window(sin, order, cfg.merge_unit)
    max_full, max_window = _max_len(cu_full), _max_len(cu_window)
    for i, block in enumerate(w.blocks):
        full = i in cfg.fullatt_block_indexes
        x = vision_block(x, block, cfg, cos, sin, cu_full if full else cu_window,
                         max_full if full else max_window, tp)
    merged = patch_merger(x, w, cfg, tp)  # [N / merge_unit, out]
    if order is not None:
        merged = merged[torch.argsort(order)]  # back to the items' own order
    out_dtype = out_dtype or dtype
    if out_dtype == torch.float16:
        merged = merged.clamp(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
    return merged.to(out_dtype)
