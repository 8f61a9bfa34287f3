"""QwenVLModel: a checkpoint's config and weights, and the few calls an engine makes.

    model = load_model("path/to/Qwen2.5-VL-7B-Instruct", dtype="auto", device="cuda")
    media = model.encode_media(pixel_values, grid_thw)                 # [M, H]
    positions, delta = model.rope_index(prompt_ids, image_grid_thw=grid_thw)
    embeds = model.embed(prompt_ids, media_rows, media)                  # [T, H]: media at its pads
    kv = model.allocate_kv_cache(num_blocks, block_size)
    hidden = model.forward(positions, meta, kv, inputs_embeds=embeds)   # [T, H]
    logits = model.compute_logits(hidden, last_rows)                    # [B, V] fp32
    ... then one token per sequence per step, positions from decode_positions(len, 1, delta).

Tensor parallel: `load_model(path, dtype, tp.device, tp=parallel.init_from_env())` on every rank;
each rank holds its shards and its kv heads, every call is collective (all ranks make the same
calls with the same inputs) and returns the same result on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_vl_triton.modeling import language, rope_index, vision
from qwen_vl_triton.modeling.attention_metadata import AttentionMetadata
from qwen_vl_triton.modeling.config import ModelConfig, load_config, parse_dtype
from qwen_vl_triton.modeling.linear import weight_bytes
from qwen_vl_triton.modeling.weights import ModelWeights, load_weights
from qwen_vl_triton.parallel.group import SINGLE_PROCESS, TPGroup
from qwen_vl_triton.parallel.sharding import local_kv_heads


@dataclass
class QwenVLModel:
    """Qwen2-VL / QVQ / Qwen2.5-VL: config + weights; all methods are thin calls into
    modeling.vision / modeling.language / modeling.rope_index. `tp`: the tensor-parallel group
    the weights were sharded for (the single process by default)."""

    config: ModelConfig
    weights: ModelWeights
    tp: TPGroup = SINGLE_PROCESS

    @property
    def dtype(self) -> torch.dtype:
        """The model's weights and activations dtype."""
        return self.weights.dtype

    @property
    def weight_bytes(self) -> int:
        """Bytes of this rank's weights (int8 layers and their scales counted as stored)."""
        return weight_bytes(self.weights)

    @property
    def quantization(self) -> str:
        """The checkpoint's quantized format in words, or 'none'."""
        quant = self.weights.quantization
        return quant.describe() if quant is not None else "none"

    @property
    def device(self) -> torch.device:
        """The device the weights (and the KV cache) live on."""
        return self.weights.language.embed_tokens.device

    def encode_media(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Packed images and/or videos -> LLM embeddings.

        pixel_values [N, C * tp * p * p], grid_thw [n_items, 3] -> [N / merge_unit, H] in the
        model dtype; rows follow the items in order (items of different sizes in one call).
        """
        return vision.vision_forward(self.weights.vision, self.config.vision, pixel_values, grid_thw,
                                     out_dtype=self.dtype, tp=self.tp)

    def rope_index(self, input_ids: Sequence[int] | torch.Tensor,
                   image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                   second_per_grid_ts: Sequence[float] | None = None) -> tuple[torch.Tensor, int]:
        """Prompt positions [3, L] int64 (CPU) and the rope delta for decoding."""
        return rope_index.get_rope_index(input_ids, self.config, image_grid_thw, video_grid_thw,
                                         second_per_grid_ts)

    def embed(self, input_ids: torch.Tensor, media_rows: torch.Tensor | None = None,
              media_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [T, H] of input_ids [T], with rows media_rows [M] (int64 indices into
        input_ids: their image / video pads, any order) replaced by media_embeds [M, H]."""
        embeds = language.embed_tokens(self.weights.language, input_ids.to(self.device), self.tp)
        if media_rows is not None and media_embeds is not None:
            embeds[media_rows.to(self.device)] = media_embeds.to(self.device, embeds.dtype)
        return embeds

    def forward(self, positions: torch.Tensor, attn_metadata: AttentionMetadata,
                kv_caches: list[language.KVCache], input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One step over packed tokens: input_ids [T] or inputs_embeds [T, H], positions [3, T].

        Writes the step's K/V into kv_caches; returns final-normed hidden states [T, H].
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = language.embed_tokens(self.weights.language, input_ids.to(self.device), self.tp)
        return language.decoder_forward(self.weights.language, self.config.text, inputs_embeds,
                                        positions.to(self.device), attn_metadata, kv_caches, self.tp)

    def compute_logits(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [n, V] of hidden [T, H] at `rows` (all rows when None); the full vocabulary
        on every rank under tensor parallelism."""
        return language.compute_logits(self.weights.language, hidden, rows, self.tp, self.config.text.vocab_size)

    def allocate_kv_cache(self, num_blocks: int, block_size: int,
                          dtype: torch.dtype | None = None) -> list[language.KVCache]:
        """(k_cache, v_cache) per layer, each [num_blocks, block_size, Hk, D]; Hk: this rank's kv
        heads (local_kv_heads). Left uninitialised: attention reads only slots below each
        sequence's context length, which were written first (the kernel tests fill unused slots
        with NaN to prove it), and untouched pages of a large CPU cache cost no memory."""
        t = self.config.text
        shape = (num_blocks, block_size, local_kv_heads(t.num_kv_heads, self.tp.world_size), t.head_dim)
        dtype = dtype or self.dtype
        return [(torch.empty(shape, dtype=dtype, device=self.device),
                 torch.empty(shape, dtype=dtype, device=self.device)) for _ in range(t.num_layers)]


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """'auto' / None -> the checkpoint's torch_dtype (bf16 when it names none); names -> dtype."""
    if dtype is None or dtype == "auto":
        return config.torch_dtype or torch.bfloat16
    resolved = parse_dtype(dtype)
    assert resolved is not None
    return resolved


def load_model(path: str | Path, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device = "cpu", tp: TPGroup = SINGLE_PROCESS,
               quantization: str | None = None) -> QwenVLModel:
    """Read config.json and the safetensors of a checkpoint directory into a QwenVLModel (only
    this rank's shards under tensor parallelism). quantization: None detects a quantized
    checkpoint's format; a name ('ascend', 'compressed-tensors') must match it."""
    config = load_config(path)
    resolved = resolve_dtype(dtype, config)
    return QwenVLModel(config, load_weights(path, config, resolved, device, tp, quantization), tp)
