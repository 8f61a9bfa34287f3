"""The Qwen2 decoder with MRoPE over a paged KV cache, as functions.

One call runs a step over packed tokens of B sequences (T tokens in all): prefill chunks,
prefix-cache continuations and decode steps look the same from here, the AttentionMetadata
says where each token's K/V goes and what it attends to. Per layer:

    x -> RMSNorm -> qkv (+bias) -> MRoPE(q, k) -> write K/V to cache -> paged attention -> o_proj
      -> (+residual) RMSNorm -> gate_up -> SiLU * up -> down -> (+residual)

The residual add is fused into the next norm (kernels.add_rms_norm). The linear layers go
through modeling.linear.linear: float weights, or int8 ones of a quantized checkpoint.

Tensor parallelism (tp.world_size > 1; weights sharded by modeling.weights): each rank runs its
Hq / world query heads and their kv heads (qkv column-parallel), o_proj and down_proj are
row-parallel and end in the all-reduce written out in `attention` and `mlp`; the embedding and
the LM head are split by vocabulary rows (masked lookup + all-reduce; logits all-gathered, so
every rank sees the same full logits). At world size 1 every collective is a no-op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_vl_triton import kernels
from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.config import TextConfig
from qwen_vl_triton.modeling.linear import linear
from qwen_vl_triton.modeling.weights import DecoderLayerWeights, LanguageWeights
from qwen_vl_triton.parallel.comm import all_gather, all_reduce
from qwen_vl_triton.parallel.group import SINGLE_PROCESS, TPGroup
from qwen_vl_triton.parallel.sharding import local_kv_heads

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache) [NB, BS, Hk, D] each


def embed_tokens(w: LanguageWeights, input_ids: torch.Tensor, tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """[T] int -> [T, H] in the weights' dtype.

    Vocab-parallel: rank r holds rows [r * n, (r + 1) * n) of the table (n = w.embed_tokens rows);
    tokens outside them look up zeros, and the all-reduce sums in the one rank's row (exactly:
    the other terms are 0).
    """
    if tp.world_size == 1:
        return F.embedding(input_ids, w.embed_tokens)
    rows = w.embed_tokens.shape[0]
    local = input_ids - tp.rank * rows
    outside = (local < 0) | (local >= rows)  # [T]
    out = F.embedding(local.masked_fill(outside, 0), w.embed_tokens)  # [T, H]
    return all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0), tp)


def attention(x: torch.Tensor, w: DecoderLayerWeights, cfg: TextConfig, positions: torch.Tensor,
              meta: AttentionMetadata, cache: KVCache, tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """Self-attention of one layer: x [T, H] (normed) -> [T, H]; writes this step's K/V.

    Hq, Hk below are this rank's heads: cfg.num_heads / world and local_kv_heads(...).
    """
    t = x.shape[0]
    num_heads, num_kv_heads = cfg.num_heads // tp.world_size, local_kv_heads(cfg.num_kv_heads, tp.world_size)
    q_size, kv_size = num_heads * cfg.head_dim, num_kv_heads * cfg.head_dim
    qkv = linear(x, w.qkv_weight, w.qkv_bias)  # [T, (Hq + 2 Hk) D]
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(t, num_heads, cfg.head_dim)  # [T, Hq, D]
    k = k.reshape(t, num_kv_heads, cfg.head_dim)  # [T, Hk, D]
    v = v.reshape(t, num_kv_heads, cfg.head_dim)
    q, k = kernels.apply_mrope(q, k, positions, cfg.mrope_section, cfg.rope_theta)
    k_cache, v_cache = cache
    kernels.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)  # in place
    if meta.is_decode:  # one query per sequence: T == B
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens)
    else:
        out = kernels.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                              meta.cu_seqlens_q, meta.context_lens)
    # o_proj is row-parallel: this rank's heads give a partial sum over its Hq D inputs.
    return all_reduce(linear(out.reshape(t, q_size), w.o_weight), tp)  # [T, H]


def mlp(x: torch.Tensor, w: DecoderLayerWeights, tp: TPGroup = SINGLE_PROCESS) -> torch.Tensor:
    """[T, H] -> [T, H]: down(silu(gate(x)) * up(x)) with gate/up as one matmul.

    gate/up are column-parallel (this rank's share of I), down row-parallel: one all-reduce.
    """
    h = kernels.silu_and_mul(linear(x, w.gate_up_weight))  # [T, I_rank]
    return all_reduce(linear(h, w.down_weight), tp)  # [T, H]


def decoder_forward(w: LanguageWeights, cfg: TextConfig, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata, kv_caches: list[KVCache], tp: TPGroup = SINGLE_PROCESS
                    ) -> torch.Tensor:
    """Run all layers and the final norm.

    hidden:    [T, H] input embeddings (text and media), the weights' dtype
    positions: [3, T] int MRoPE positions (rope_index.get_rope_index / decode_positions)
    kv_caches: one (k_cache, v_cache) per layer, [NB, BS, Hk, D] (this rank's kv heads); written
               in place
    tp:        the tensor-parallel group (two all-reduces per layer); the default is one process
    Returns the normed hidden states [T, H].
    """
    if positions.dim() != 2 or positions.shape != (3, hidden.shape[0]):
        raise ValueError(f"positions must be [3, {hidden.shape[0]}], got {list(positions.shape)}")
    residual = hidden
    x = kernels.rms_norm(hidden, w.layers[0].input_norm, cfg.rms_norm_eps)
    for i, layer in enumerate(w.layers):
        if i > 0:
            x, residual = kernels.add_rms_norm(x, residual, layer.input_norm, cfg.rms_norm_eps)
        if layer.input_norm_bias is not None:  # a quantized checkpoint's anti-outlier shift
            x = x + layer.input_norm_bias
        x = attention(x, layer, cfg, positions, meta, kv_caches[i], tp)
        x, residual = kernels.add_rms_norm(x, residual, layer.post_norm, cfg.rms_norm_eps)
        if layer.post_norm_bias is not None:
            x = x + layer.post_norm_bias
        x = mlp(x, layer, tp)
    x, _ = kernels.add_rms_norm(x, residual, w.norm, cfg.rms_norm_eps)
    return x


def compute_logits(w: LanguageWeights, hidden: torch.Tensor, rows: torch.Tensor | None = None,
                   tp: TPGroup = SINGLE_PROCESS, vocab_size: int | None = None) -> torch.Tensor:
    """Logits [n, V] fp32 of hidden [T, H] at `rows` (e.g. each sequence's last token; all
    rows when None). Only the asked-for rows go through the [V, H] matmul.

    Vocab-parallel: each rank computes its [n, V / world] (padded) slice and the all-gather puts
    the full logits on every rank, cut to `vocab_size` (the padding rows' logits are dropped).
    """
    if rows is not None:
        hidden = hidden[rows]
    logits = F.linear(hidden, w.lm_head)  # [n, V / world]
    if tp.world_size > 1 and logits.shape[0] > 0:  # n is the same on every rank
        logits = all_gather(logits, tp, dim=-1)[:, :vocab_size]  # [n, V]
    return logits.float()
