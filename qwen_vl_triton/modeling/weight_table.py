"""Every tensor of a Qwen2-VL / Qwen2.5-VL checkpoint, said once: its names, its split, its shape.

Each checkpoint tensor is one `WeightEntry` below, holding
  - its name in both layouts, through its `Part`: the hub's (model.embed_tokens, model.layers.*,
    model.norm, lm_head, visual.*), which is the canonical one, and transformers >= 4.52's
    (model.language_model.*, model.visual.*, lm_head); `{i}` stands for the layer / block index;
  - its ShardKind: how tensor parallelism splits it (parallel/sharding.py does the arithmetic);
  - its full shape as a function of the ModelConfig (through `Dims`);
  - which configs have it (Qwen2-VL's LayerNorm biases and fc1 / fc2 MLP, Qwen2.5-VL's gated MLP)
    and which may omit it (lm_head when the embeddings are tied).
The loader (modeling/weights.py) reads tensors by entry; the name check, the shape check, each
rank's shard and the tiny checkpoint's renaming (testing/tiny_checkpoint.py) read this table too.
`check_tp_sizes` says which world sizes a config's head and MLP sizes can be split over.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

from qwen_vl_triton.modeling.config import ModelConfig
from qwen_vl_triton.parallel import sharding
from qwen_vl_triton.parallel.group import TPGroup
from qwen_vl_triton.parallel.sharding import HeadLayout, ShardKind, ShardSpec

# Tensors some checkpoints carry that the model recomputes (rotary tables): skipped, not errors.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


@dataclass(frozen=True)
class Part:
    """A part of the model: its tensors' name prefixes and the sizes its `{i}` and head tensors use."""

    hub: str  # prefix in the hub layout (canonical)
    nested: str  # prefix in transformers >= 4.52's layout
    aliases: tuple[str, ...]  # further prefixes some checkpoints use: read, never written
    count: Callable[[ModelConfig], int]  # entries with `{i}` repeat this many times
    attention: Callable[[ModelConfig], HeadLayout]  # what the head ShardKinds split


TEXT = Part("model.", "model.language_model.", ("language_model.model.",),
            count=lambda c: c.text.num_layers,
            attention=lambda c: HeadLayout(c.text.num_heads, c.text.num_kv_heads, c.text.head_dim))
VISION = Part("visual.", "model.visual.", (),
              count=lambda c: c.vision.depth,
              attention=lambda c: HeadLayout(c.vision.num_heads, c.vision.num_heads, c.vision.head_dim))
HEAD = Part("lm_head.", "lm_head.", ("language_model.lm_head.",), count=TEXT.count, attention=TEXT.attention)
PARTS = (TEXT, VISION, HEAD)


@dataclass(frozen=True)
class Dims:
    """The sizes checkpoint shapes are made of, for one config."""

    vocab: int  # V
    hidden: int  # H, the decoder's width
    q: int  # Hq * D
    kv: int  # Hk * D
    inter: int  # I, the decoder MLP's features
    width: int  # E, the ViT's width
    v_attn: int  # the ViT's heads * head dim
    v_inter: int  # the ViT MLP's features
    merged: int  # E * merge_unit: the merger's input, one LLM token's patches side by side
    out: int  # the merger's output width (= H)
    patch: tuple[int, int, int, int]  # C, tp, p, p of the Conv3d patch embedding

    @classmethod
    def of(cls, config: ModelConfig) -> Dims:
        t, v = config.text, config.vision
        return cls(vocab=t.vocab_size, hidden=t.hidden_size, q=t.num_heads * t.head_dim,
                   kv=t.num_kv_heads * t.head_dim, inter=t.intermediate_size, width=v.hidden_size,
                   v_attn=v.num_heads * v.head_dim, v_inter=v.intermediate_size,
                   merged=v.hidden_size * v.merge_unit, out=v.out_hidden_size,
                   patch=(v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size))


def _always(config: ModelConfig) -> bool:
    return True


def _never(config: ModelConfig) -> bool:
    return False


def _layer_norm(config: ModelConfig) -> bool:
    """LayerNorm carries a bias (Qwen2-VL's ViT); RMSNorm (Qwen2.5-VL's) has none."""
    return config.vision.norm == "layernorm"


def _qwen2_vl(config: ModelConfig) -> bool:
    """Qwen2-VL's ViT MLP: fc2(QuickGELU(fc1(x)))."""
    return config.model_type == "qwen2_vl"


def _qwen2_5_vl(config: ModelConfig) -> bool:
    """Qwen2.5-VL's ViT MLP: down(SiLU(gate(x)) * up(x)), biases on all three."""
    return config.model_type == "qwen2_5_vl"


def _tied(config: ModelConfig) -> bool:
    """Tied embeddings: released 2B / 3B checkpoints store no lm_head.weight."""
    return config.tie_word_embeddings


@dataclass(frozen=True)
class WeightEntry:
    """One checkpoint tensor (one per layer / block when `local` has `{i}`)."""

    part: Part
    local: str  # the name after the part's prefix
    shard: ShardKind
    dims: Callable[[Dims], tuple[int, ...]]  # the full (unsharded) shape
    present: Callable[[ModelConfig], bool] = _always  # configs whose checkpoints have it
    optional: Callable[[ModelConfig], bool] = _never  # configs whose checkpoints may omit it

    @property
    def repeated(self) -> bool:
        return "{i}" in self.local

    def name(self, i: int | None = None, nested: bool = False) -> str:
        """The tensor's name, of layer / block `i` when repeated; hub layout, or transformers >= 4.52's."""
        return (self.part.nested if nested else self.part.hub) + self.local.format(i=i)

    def names(self, config: ModelConfig) -> list[str]:
        """Canonical names of every copy `config` implies (none when not `present`)."""
        if not self.present(config):
            return []
        if not self.repeated:
            return [self.name()]
        return [self.name(i) for i in range(self.part.count(config))]

    def shape(self, config: ModelConfig) -> list[int]:
        """The full shape config.json implies."""
        return list(self.dims(Dims.of(config)))

    def shard_spec(self, shape: Sequence[int], config: ModelConfig, tp: TPGroup) -> ShardSpec:
        """The part of this tensor (full shape `shape`) that rank tp.rank holds."""
        return sharding.spec(self.shard, shape, tp, self.part.attention(config))

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """Matches the canonical names of this entry."""
        return re.compile(re.escape(self.name("{i}")).replace(re.escape("{i}"), r"\d+") + "$")


K = ShardKind  # short, so that each entry below fits one line

# ---------------------------------------------------------------- the decoder (H hidden, I MLP features)
EMBED_TOKENS = WeightEntry(TEXT, "embed_tokens.weight", K.VOCAB, lambda d: (d.vocab, d.hidden))
FINAL_NORM = WeightEntry(TEXT, "norm.weight", K.REPLICATED, lambda d: (d.hidden,))
LM_HEAD = WeightEntry(HEAD, "weight", K.VOCAB, lambda d: (d.vocab, d.hidden), optional=_tied)
INPUT_NORM = WeightEntry(TEXT, "layers.{i}.input_layernorm.weight", K.REPLICATED, lambda d: (d.hidden,))
POST_ATTN_NORM = WeightEntry(TEXT, "layers.{i}.post_attention_layernorm.weight", K.REPLICATED, lambda d: (d.hidden,))
Q_PROJ = WeightEntry(TEXT, "layers.{i}.self_attn.q_proj.weight", K.HEADS, lambda d: (d.q, d.hidden))
Q_PROJ_BIAS = WeightEntry(TEXT, "layers.{i}.self_attn.q_proj.bias", K.HEADS, lambda d: (d.q,))
K_PROJ = WeightEntry(TEXT, "layers.{i}.self_attn.k_proj.weight", K.KV_HEADS, lambda d: (d.kv, d.hidden))
K_PROJ_BIAS = WeightEntry(TEXT, "layers.{i}.self_attn.k_proj.bias", K.KV_HEADS, lambda d: (d.kv,))
V_PROJ = WeightEntry(TEXT, "layers.{i}.self_attn.v_proj.weight", K.KV_HEADS, lambda d: (d.kv, d.hidden))
V_PROJ_BIAS = WeightEntry(TEXT, "layers.{i}.self_attn.v_proj.bias", K.KV_HEADS, lambda d: (d.kv,))
O_PROJ = WeightEntry(TEXT, "layers.{i}.self_attn.o_proj.weight", K.HEADS_IN, lambda d: (d.hidden, d.q))
GATE_PROJ = WeightEntry(TEXT, "layers.{i}.mlp.gate_proj.weight", K.COLUMN, lambda d: (d.inter, d.hidden))
UP_PROJ = WeightEntry(TEXT, "layers.{i}.mlp.up_proj.weight", K.COLUMN, lambda d: (d.inter, d.hidden))
DOWN_PROJ = WeightEntry(TEXT, "layers.{i}.mlp.down_proj.weight", K.ROW, lambda d: (d.hidden, d.inter))

# ---------------------------------------------------------------- the ViT (E width) and its patch merger
PATCH_EMBED = WeightEntry(VISION, "patch_embed.proj.weight", K.REPLICATED, lambda d: (d.width, *d.patch))
VIT_NORM1 = WeightEntry(VISION, "blocks.{i}.norm1.weight", K.REPLICATED, lambda d: (d.width,))
VIT_NORM1_BIAS = WeightEntry(VISION, "blocks.{i}.norm1.bias", K.REPLICATED, lambda d: (d.width,), _layer_norm)
VIT_NORM2 = WeightEntry(VISION, "blocks.{i}.norm2.weight", K.REPLICATED, lambda d: (d.width,))
VIT_NORM2_BIAS = WeightEntry(VISION, "blocks.{i}.norm2.bias", K.REPLICATED, lambda d: (d.width,), _layer_norm)
VIT_QKV = WeightEntry(VISION, "blocks.{i}.attn.qkv.weight", K.HEADS, lambda d: (3 * d.v_attn, d.width))
VIT_QKV_BIAS = WeightEntry(VISION, "blocks.{i}.attn.qkv.bias", K.HEADS, lambda d: (3 * d.v_attn,))
VIT_PROJ = WeightEntry(VISION, "blocks.{i}.attn.proj.weight", K.HEADS_IN, lambda d: (d.width, d.v_attn))
VIT_PROJ_BIAS = WeightEntry(VISION, "blocks.{i}.attn.proj.bias", K.FIRST_RANK, lambda d: (d.width,))
VIT_FC1 = WeightEntry(VISION, "blocks.{i}.mlp.fc1.weight", K.COLUMN, lambda d: (d.v_inter, d.width), _qwen2_vl)
VIT_FC1_BIAS = WeightEntry(VISION, "blocks.{i}.mlp.fc1.bias", K.COLUMN, lambda d: (d.v_inter,), _qwen2_vl)
VIT_FC2 = WeightEntry(VISION, "blocks.{i}.mlp.fc2.weight", K.ROW, lambda d: (d.width, d.v_inter), _qwen2_vl)
VIT_FC2_BIAS = WeightEntry(VISION, "blocks.{i}.mlp.fc2.bias", K.FIRST_RANK, lambda d: (d.width,), _qwen2_vl)
VIT_GATE = WeightEntry(VISION, "blocks.{i}.mlp.gate_proj.weight", K.COLUMN, lambda d: (d.v_inter, d.width),
                       _qwen2_5_vl)
VIT_GATE_BIAS = WeightEntry(VISION, "blocks.{i}.mlp.gate_proj.bias", K.COLUMN, lambda d: (d.v_inter,), _qwen2_5_vl)
VIT_UP = WeightEntry(VISION, "blocks.{i}.mlp.up_proj.weight", K.COLUMN, lambda d: (d.v_inter, d.width), _qwen2_5_vl)
VIT_UP_BIAS = WeightEntry(VISION, "blocks.{i}.mlp.up_proj.bias", K.COLUMN, lambda d: (d.v_inter,), _qwen2_5_vl)
VIT_DOWN = WeightEntry(VISION, "blocks.{i}.mlp.down_proj.weight", K.ROW, lambda d: (d.width, d.v_inter),
                       _qwen2_5_vl)
VIT_DOWN_BIAS = WeightEntry(VISION, "blocks.{i}.mlp.down_proj.bias", K.FIRST_RANK, lambda d: (d.width,), _qwen2_5_vl)
MERGER_NORM = WeightEntry(VISION, "merger.ln_q.weight", K.REPLICATED, lambda d: (d.width,))
MERGER_NORM_BIAS = WeightEntry(VISION, "merger.ln_q.bias", K.REPLICATED, lambda d: (d.width,), _layer_norm)
MERGER_FC1 = WeightEntry(VISION, "merger.mlp.0.weight", K.COLUMN, lambda d: (d.merged, d.merged))
MERGER_FC1_BIAS = WeightEntry(VISION, "merger.mlp.0.bias", K.COLUMN, lambda d: (d.merged,))
MERGER_FC2 = WeightEntry(VISION, "merger.mlp.2.weight", K.ROW, lambda d: (d.out, d.merged))
MERGER_FC2_BIAS = WeightEntry(VISION, "merger.mlp.2.bias", K.FIRST_RANK, lambda d: (d.out,))

WEIGHTS: tuple[WeightEntry, ...] = (
    EMBED_TOKENS, FINAL_NORM, LM_HEAD, INPUT_NORM, POST_ATTN_NORM, Q_PROJ, Q_PROJ_BIAS, K_PROJ, K_PROJ_BIAS,
    V_PROJ, V_PROJ_BIAS, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ,
    PATCH_EMBED, VIT_NORM1, VIT_NORM1_BIAS, VIT_NORM2, VIT_NORM2_BIAS, VIT_QKV, VIT_QKV_BIAS, VIT_PROJ,
    VIT_PROJ_BIAS, VIT_FC1, VIT_FC1_BIAS, VIT_FC2, VIT_FC2_BIAS, VIT_GATE, VIT_GATE_BIAS, VIT_UP, VIT_UP_BIAS,
    VIT_DOWN, VIT_DOWN_BIAS, MERGER_NORM, MERGER_NORM_BIAS, MERGER_FC1, MERGER_FC1_BIAS, MERGER_FC2,
    MERGER_FC2_BIAS,
)


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name to the hub layout (model.layers.*, visual.*, lm_head.*)."""
    for part in PARTS:
        for prefix in (part.nested, *part.aliases):
            if name.startswith(prefix):
                return part.hub + name[len(prefix):]
    return name


def nested_name(name: str) -> str:
    """Map a canonical tensor name to transformers >= 4.52's layout (model.language_model.*, model.visual.*)."""
    part = next((p for p in PARTS if name.startswith(p.hub)), None)
    return name if part is None else part.nested + name[len(part.hub):]


def entry_for(name: str) -> WeightEntry:
    """The entry of canonical tensor `name` (KeyError: no checkpoint tensor has that name)."""
    entry = next((e for e in WEIGHTS if e.pattern.match(name)), None)
    if entry is None:
        raise KeyError(f"{name!r} is not a Qwen2-VL / Qwen2.5-VL checkpoint tensor")
    return entry


def expected_names(config: ModelConfig) -> list[str]:
    """Every canonical tensor name the config implies (optional ones, like a tied lm_head, included)."""
    return [name for entry in WEIGHTS for name in entry.names(config)]


def optional_names(config: ModelConfig) -> set[str]:
    """The expected names a checkpoint of `config` may lack."""
    return {name for entry in WEIGHTS if entry.optional(config) for name in entry.names(config)}


def shard_spec(name: str, shape: Sequence[int], config: ModelConfig, tp: TPGroup) -> ShardSpec:
    """The part of checkpoint tensor `name` (full shape `shape`) that rank tp.rank holds."""
    return entry_for(name).shard_spec(shape, config, tp)


def _tp_size_problems(config: ModelConfig, world_size: int) -> list[str]:
    """The sizes (named, with their values) that tensor parallelism over `world_size` cannot split."""
    t, v = config.text, config.vision
    heads = {"text num_attention_heads": t.num_heads, "vision num_heads": v.num_heads}
    problems = [f"{name} {n}" for name, n in heads.items() if n % world_size]
    mlps = {"text intermediate_size": t.intermediate_size, "vision MLP intermediate size": v.intermediate_size,
            "vision merger width": v.hidden_size * v.merge_unit}
    problems += [f"{name} {n} (fewer features than ranks)" for name, n in mlps.items() if n < world_size]
    hk = t.num_kv_heads
    if (hk >= world_size and hk % world_size) or (hk < world_size and world_size % hk):
        problems.append(f"text num_key_value_heads {hk} (with fewer kv heads than ranks, the world size must "
                        f"be a multiple of them)")
    return problems


def check_tp_sizes(config: ModelConfig, world_size: int) -> None:
    """Raise parallel.sharding.TPSizeError naming every size `world_size` must divide and does not.

    Attention heads (text and vision) and kv heads (or, with fewer kv heads than ranks, the world
    size must be a multiple of them). MLP intermediate sizes are split in balanced shares and the
    vocabulary is padded, so neither needs to divide (they only need one feature per rank).
    """
    if world_size < 1:
        raise sharding.TPSizeError(f"world size must be >= 1, got {world_size}")
    problems = _tp_size_problems(config, world_size)
    if problems:
        fits = [str(w) for w in (1, 2, 4, 8) if not _tp_size_problems(config, w)]
        raise sharding.TPSizeError(f"tensor parallelism over {world_size} processes: the world size must divide "
                                   + "; ".join(problems) + f". Use a world size that does (e.g. {', '.join(fits)}).")
