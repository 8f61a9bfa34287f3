"""The Qwen2 decoder with MRoPE over a paged KV cache, as functions.

One call runs a step over packed tokens of B sequences (T tokens in all): prefill chunks,
prefix-cache continuations and decode steps look the same from here, the AttentionMetadata
says where each token's K/V goes and what it attends to. Per layer:

    x -> RMSNorm -> qkv (+bias) -> MRoPE(q, k) -> write K/V to cache -> paged attention -> o_proj
      -> (+residual) RMSNorm -> gate_up -> SiLU * up -> down -> (+residual)

The residual add is fused into the next norm (kernels.add_rms_norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kernels
from modeling.attention_metadata import AttentionMetadata
from modeling.config import TextConfig
from modeling.weights import DecoderLayerWeights, LanguageWeights

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache) [NB, BS, Hk, D] each


def embed_tokens(w: LanguageWeights, input_ids: torch.Tensor) -> torch.Tensor:
    """[T] int -> [T, H] in the weights' dtype."""
    return F.embedding(input_ids, w.embed_tokens)


def scatter_media(embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int,
                  media: torch.Tensor) -> torch.Tensor:
    """Put media embeddings [M, H] at the M positions of `token_id` in input_ids [T], in order.

    Returns a new [T, H] tensor; raises if the counts differ.
    """
    mask = input_ids == token_id
    count = int(mask.sum())
    if count != media.shape[0]:
        raise ValueError(f"{count} tokens with id {token_id} but {media.shape[0]} media embeddings")
    out = embeds.clone()
    out[mask] = media.to(embeds.dtype)
    return out


def attention(x: torch.Tensor, w: DecoderLayerWeights, cfg: TextConfig, positions: torch.Tensor,
              meta: AttentionMetadata, cache: KVCache) -> torch.Tensor:
    """Self-attention of one layer: x [T, H] (normed) -> [T, H]; writes this step's K/V."""
    t = x.shape[0]
    q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    qkv = F.linear(x, w.qkv_weight, w.qkv_bias)  # [T, (Hq + 2 Hk) D]
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(t, cfg.num_heads, cfg.head_dim)  # [T, Hq, D]
    k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)  # [T, Hk, D]
    v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
    q, k = kernels.apply_mrope(q, k, positions, cfg.mrope_section, cfg.rope_theta)
    k_cache, v_cache = cache
    kernels.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)  # in place
    if meta.is_decode:  # one query per sequence: T == B
        out = kernels.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens)
    else:
        out = kernels.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables,
                                              meta.cu_seqlens_q, meta.context_lens)
    return F.linear(out.reshape(t, q_size), w.o_weight)  # [T, H]


def mlp(x: torch.Tensor, w: DecoderLayerWeights) -> torch.Tensor:
    """[T, H] -> [T, H]: down(silu(gate(x)) * up(x)) with gate/up as one matmul."""
    return F.linear(kernels.silu_and_mul(F.linear(x, w.gate_up_weight)), w.down_weight)


def decoder_forward(w: LanguageWeights, cfg: TextConfig, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata, kv_caches: list[KVCache]) -> torch.Tensor:
    """Run all layers and the final norm.

    hidden:    [T, H] input embeddings (text and media), the weights' dtype
    positions: [3, T] int MRoPE positions (rope_index.get_rope_index / decode_positions)
    kv_caches: one (k_cache, v_cache) per layer, [NB, BS, Hk, D]; written in place
    Returns the normed hidden states [T, H].
    """
    if positions.dim() != 2 or positions.shape != (3, hidden.shape[0]):
        raise ValueError(f"positions must be [3, {hidden.shape[0]}], got {list(positions.shape)}")
    residual = hidden
    x = kernels.rms_norm(hidden, w.layers[0].input_norm, cfg.rms_norm_eps)
    for i, layer in enumerate(w.layers):
        if i > 0:
            x, residual = kernels.add_rms_norm(x, residual, layer.input_norm, cfg.rms_norm_eps)
        x = attention(x, layer, cfg, positions, meta, kv_caches[i])
        x, residual = kernels.add_rms_norm(x, residual, layer.post_norm, cfg.rms_norm_eps)
        x = mlp(x, layer)
    x, _ = kernels.add_rms_norm(x, residual, w.norm, cfg.rms_norm_eps)
    return x


def compute_logits(w: LanguageWeights, hidden: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, V] fp32 of hidden [T, H] at `rows` (e.g. each sequence's last token; all
    rows when None). Only the asked-for rows go through the [V, H] matmul."""
    if rows is not None:
        hidden = hidden[rows]
    return F.linear(hidden, w.lm_head).float()
