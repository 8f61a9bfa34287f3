"""Safetensors checkpoints -> plain dataclasses of tensors, in the layout the forward passes use.

Reading goes through one lazy function, `CheckpointReader.get(name, index)`: the files are
memory-mapped (safetensors.safe_open) and only the asked-for tensor, or the asked-for slice of
it (`index`, a tuple of slices, via get_slice), is read. A tensor-parallel loader can therefore
read just its shard of every weight.

Names are normalised to one canonical layout, the hub's:
    model.embed_tokens.*, model.layers.*, model.norm.*, lm_head.*, visual.*
Checkpoints saved by transformers >= 4.52 use model.language_model.* and model.visual.*; both load.

Layout changes made at load time (why: fewer, larger matmuls and the kernels' input layouts):
  - q/k/v projections are concatenated into one qkv weight [(Hq + 2 Hk) * D, hidden] (+ bias);
  - gate/up projections into one gate_up weight [2 * I, hidden], the [gate | up] layout that
    kernels.silu_and_mul takes (Qwen2.5-VL's vision MLP too, with its biases);
  - the Conv3d patch embedding [E, C, tp, p, p] becomes a matmul weight [E, C * tp * p * p]
    over the processor's flattened patches (stride == kernel, so the convolution is a matmul).
Linear weights stay [out, in] (torch.nn.functional.linear's layout).

Tensor parallelism (a TPGroup with world_size > 1): every tensor is read as its ShardSpec
(`shard_spec`, by tensor kind, rules in parallel/sharding.py) says, through get_slice, so a rank
reads only its part: q/k/v by heads and gate/up column-parallel (each sliced before fusing, so
the fused qkv is [q_r | k_r | v_r] and gate_up [gate_r | up_r]), o_proj / down_proj and the ViT's
proj / fc2 / merger fc2 row-parallel (their biases on rank 0 only), the embedding and LM head by
vocabulary rows (padded), everything else replicated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from modeling.config import ModelConfig
from parallel import sharding
from parallel.group import SINGLE_PROCESS, TPGroup
from parallel.sharding import ShardSpec

# Tensors some checkpoints carry that the model recomputes (rotary tables): skipped, not errors.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


class WeightsError(ValueError):
    """The checkpoint's tensors do not match what the config describes."""


def canonical_name(name: str) -> str:
    """Map a checkpoint tensor name to the hub layout (model.layers.*, visual.*, lm_head.*)."""
    for prefix, new in (("model.language_model.", "model."), ("model.visual.", "visual."),
                        ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")):
        if name.startswith(prefix):
            return new + name[len(prefix):]
    return name


class CheckpointReader:
    """Lazy, per-tensor access to the *.safetensors of one checkpoint directory.

    Handles a single model.safetensors, a sharded checkpoint with model.safetensors.index.json,
    or any set of *.safetensors files. Tensors are addressed by canonical name.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        index_file = path / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"no *.safetensors files in {path}")
        self._handles = {f: safe_open(str(path / f), framework="pt", device="cpu") for f in files}
        self._where: dict[str, tuple[str, str]] = {}  # canonical -> (file, name in the file)
        for f, handle in self._handles.items():
            names = handle.keys()  # safe_open handles are not iterable
            for name in names:
                canon = canonical_name(name)
                if canon in self._where:
                    raise WeightsError(f"tensor {canon!r} appears twice ({name!r} in {f})")
                self._where[canon] = (f, name)

    def names(self) -> set[str]:
        """Canonical names of every tensor in the checkpoint."""
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> list[int]:
        """The full shape of tensor `name`, read from the file header (no data)."""
        f, original = self._locate(name)
        return list(self._handles[f].get_slice(original).get_shape())

    def get(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Read one tensor (or only `index`, a tuple of slices, of it) from the memory map."""
        f, original = self._locate(name)
        if index is None:
            return self._handles[f].get_tensor(original)
        return self._handles[f].get_slice(original)[index]

    def _locate(self, name: str) -> tuple[str, str]:
        if name not in self._where:
            raise WeightsError(f"checkpoint has no tensor {name!r}")
        return self._where[name]


# ----------------------------------------------------------------------------- containers


@dataclass
class DecoderLayerWeights:
    """One Qwen2 decoder layer. H hidden, I intermediate, D head dim.

    Shapes are one process's; under tensor parallelism Hq, Hk and I are this rank's share
    (Hq / world, local_kv_heads, a balanced share of I) and qkv / gate_up fuse this rank's slices.
    """

    input_norm: torch.Tensor  # [H]
    qkv_weight: torch.Tensor  # [(Hq + 2 Hk) * D, H]
    qkv_bias: torch.Tensor  # [(Hq + 2 Hk) * D]
    o_weight: torch.Tensor  # [H, Hq * D]
    post_norm: torch.Tensor  # [H]
    gate_up_weight: torch.Tensor  # [2 I, H]   rows: gate then up
    down_weight: torch.Tensor  # [H, I]


@dataclass
class LanguageWeights:
    """The decoder. Under tensor parallelism V is this rank's ceil(V / world) vocabulary rows."""

    embed_tokens: torch.Tensor  # [V, H]
    layers: list[DecoderLayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H]   the same tensor as embed_tokens when tied


@dataclass
class VisionBlockWeights:
    """One ViT block. E width. Norm biases are None for RMSNorm (Qwen2.5-VL).

    fc1 is Qwen2-VL's [4E, E] QuickGELU input, or Qwen2.5-VL's fused [gate | up] [2 I, E].
    Under tensor parallelism the heads (qkv rows, proj columns) and I are this rank's share, and
    proj_bias / fc2_bias are zeros except on rank 0.
    """

    norm1_weight: torch.Tensor  # [E]
    norm1_bias: torch.Tensor | None
    norm2_weight: torch.Tensor  # [E]
    norm2_bias: torch.Tensor | None
    qkv_weight: torch.Tensor  # [3E, E]
    qkv_bias: torch.Tensor  # [3E]
    proj_weight: torch.Tensor  # [E, E]
    proj_bias: torch.Tensor  # [E]
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor  # [E, I]
    fc2_bias: torch.Tensor  # [E]


@dataclass
class VisionWeights:
    """The vision tower: patch embedding as a matmul weight, the blocks, and the 2x2 patch merger."""

    patch_embed: torch.Tensor  # [E, C * tp * p * p]
    blocks: list[VisionBlockWeights]
    merger_norm_weight: torch.Tensor  # [E]
    merger_norm_bias: torch.Tensor | None  # LayerNorm (Qwen2-VL) or None (RMSNorm, Qwen2.5-VL)
    merger_fc1_weight: torch.Tensor  # [4E, 4E]
    merger_fc1_bias: torch.Tensor
    merger_fc2_weight: torch.Tensor  # [out, 4E]
    merger_fc2_bias: torch.Tensor


@dataclass
class ModelWeights:
    """Everything a forward pass reads. `vision` is in `vision_dtype` (see vision_dtype_for)."""

    language: LanguageWeights
    vision: VisionWeights
    dtype: torch.dtype
    vision_dtype: torch.dtype


def vision_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The ViT's compute dtype for a model dtype.

    fp16 activations overflow inside some vision towers (reported for Qwen2.5-VL-3B: the
    residual stream of late blocks passes 65504 and turns into inf/NaN), so an fp16 model runs
    its ViT in bf16 (fp32's range, half its memory); the merger's output is cast back to fp16.
    """
    return torch.bfloat16 if dtype == torch.float16 else dtype


# ----------------------------------------------------------------------------- loading


# Tensor-parallel kind of each tensor, by canonical name (the first match wins; no match:
# replicated). See parallel/sharding.py for what each kind means.
_TP_KINDS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), kind) for p, kind in (
    (r"^(model\.embed_tokens|lm_head)\.weight$", "vocab"),
    (r"^model\.layers\.\d+\.self_attn\.q_proj\.(weight|bias)$", "q_heads"),
    (r"^model\.layers\.\d+\.self_attn\.[kv]_proj\.(weight|bias)$", "kv_heads"),
    (r"^model\.layers\.\d+\.self_attn\.o_proj\.weight$", "o_heads"),
    (r"^model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight$", "column"),
    (r"^model\.layers\.\d+\.mlp\.down_proj\.weight$", "row"),
    (r"^visual\.blocks\.\d+\.attn\.qkv\.(weight|bias)$", "vision_qkv"),
    (r"^visual\.blocks\.\d+\.mlp\.(fc1|gate_proj|up_proj)\.(weight|bias)$", "column"),
    (r"^visual\.blocks\.\d+\.attn\.proj\.weight$", "vision_o_heads"),
    (r"^visual\.blocks\.\d+\.mlp\.(fc2|down_proj)\.weight$", "row"),
    (r"^visual\.blocks\.\d+\.(attn\.proj|mlp\.fc2|mlp\.down_proj)\.bias$", "first_rank"),
    (r"^visual\.merger\.mlp\.0\.(weight|bias)$", "column"),
    (r"^visual\.merger\.mlp\.2\.weight$", "row"),
    (r"^visual\.merger\.mlp\.2\.bias$", "first_rank"),
))


def tp_kind(name: str) -> str:
    """The tensor-parallel kind of canonical tensor `name` ("replicated" when no rule matches)."""
    return next((kind for pattern, kind in _TP_KINDS if pattern.match(name)), "replicated")


def shard_spec(name: str, shape: Sequence[int], config: ModelConfig, tp: TPGroup) -> ShardSpec:
    """The part of checkpoint tensor `name` (full shape `shape`) that rank tp.rank holds."""
    if tp.world_size == 1:
        return sharding.REPLICATED
    kind = tp_kind(name)
    t, v = config.text, config.vision
    if kind == "vocab":
        return sharding.vocab(shape[0], tp)
    if kind == "q_heads":
        return sharding.heads(t.num_heads, t.head_dim, tp)
    if kind == "o_heads":
        return sharding.heads(t.num_heads, t.head_dim, tp, dim=1)
    if kind == "kv_heads":
        return sharding.kv_heads(t.num_heads, t.num_kv_heads, t.head_dim, tp)
    if kind == "vision_qkv":
        return sharding.heads(v.num_heads, v.head_dim, tp, parts=3)
    if kind == "vision_o_heads":
        return sharding.heads(v.num_heads, v.head_dim, tp, dim=1)
    if kind == "column":
        return sharding.column(shape[0], tp)
    if kind == "row":
        return sharding.row(shape[1], tp)
    if kind == "first_rank":
        return sharding.first_rank(tp)
    return sharding.REPLICATED


class _Loader:
    """Reads tensors by canonical name, only this rank's shard of each (shard_spec), casting and
    moving them."""

    def __init__(self, reader: CheckpointReader, device: torch.device | str, config: ModelConfig,
                 tp: TPGroup):
        self.reader = reader
        self.device = device
        self.config = config
        self.tp = tp

    def __call__(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        shape = self.reader.shape(name)
        spec = shard_spec(name, shape, self.config, self.tp)
        tensor = sharding.read_shard(lambda index: self.reader.get(name, index), shape, spec, dtype)
        return tensor.to(device=self.device, dtype=dtype)

    def cat(self, names: Iterable[str], dtype: torch.dtype) -> torch.Tensor:
        """This rank's slices of several tensors, concatenated along dim 0 (fused qkv, gate_up)."""
        return torch.cat([self(n, dtype) for n in names], dim=0)

    def optional(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """This rank's slice of `name`, or None when the checkpoint lacks it (optional biases)."""
        return self(name, dtype) if name in self.reader else None


def _check_names(config: ModelConfig, reader: CheckpointReader) -> None:
    """Fail with every missing and unexpected tensor named, before reading any data."""
    expected = set(expected_names(config))
    present = {n for n in reader.names() if not n.endswith(_IGNORED_SUFFIXES)}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(expected - present - optional)
    unexpected = sorted(present - expected - optional)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:20])}")
        raise WeightsError("checkpoint does not match config.json: " + "; ".join(lines))


def expected_names(config: ModelConfig) -> list[str]:
    """Every canonical tensor name the config implies (lm_head.weight included even if tied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(config.text.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "self_attn.o_proj.weight"]
        names += [p + f"self_attn.{x}_proj.{wb}" for x in "qkv" for wb in ("weight", "bias")]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    layer_norm = config.vision.norm == "layernorm"
    names += ["visual.patch_embed.proj.weight", "visual.merger.ln_q.weight"]
    names += [f"visual.merger.mlp.{i}.{wb}" for i in (0, 2) for wb in ("weight", "bias")]
    names += ["visual.merger.ln_q.bias"] if layer_norm else []
    mlp = ("fc1", "fc2") if layer_norm else ("gate_proj", "up_proj", "down_proj")
    for i in range(config.vision.depth):
        p = f"visual.blocks.{i}."
        names += [p + f"norm{j}.weight" for j in (1, 2)]
        names += [p + f"norm{j}.bias" for j in (1, 2)] if layer_norm else []
        names += [p + f"attn.{x}.{wb}" for x in ("qkv", "proj") for wb in ("weight", "bias")]
        names += [p + f"mlp.{x}.{wb}" for x in mlp for wb in ("weight", "bias")]
    return names


def _decoder_layer(get: _Loader, i: int, dtype: torch.dtype) -> DecoderLayerWeights:
    p = f"model.layers.{i}."
    attn, mlp = p + "self_attn.", p + "mlp."
    return DecoderLayerWeights(
        input_norm=get(p + "input_layernorm.weight", dtype),
        qkv_weight=get.cat([attn + f"{x}_proj.weight" for x in "qkv"], dtype),
        qkv_bias=get.cat([attn + f"{x}_proj.bias" for x in "qkv"], dtype),
        o_weight=get(attn + "o_proj.weight", dtype),
        post_norm=get(p + "post_attention_layernorm.weight", dtype),
        gate_up_weight=get.cat([mlp + "gate_proj.weight", mlp + "up_proj.weight"], dtype),
        down_weight=get(mlp + "down_proj.weight", dtype),
    )


def _vision_block(get: _Loader, i: int, dtype: torch.dtype, gated: bool) -> VisionBlockWeights:
    p = f"visual.blocks.{i}."
    if gated:  # Qwen2.5-VL: SiLU(gate) * up, biases on all three
        fc1_w = get.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], dtype)
        fc1_b = get.cat([p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"], dtype)
        fc2 = p + "mlp.down_proj."
    else:  # Qwen2-VL: fc2(QuickGELU(fc1(x)))
        fc1_w, fc1_b = get(p + "mlp.fc1.weight", dtype), get(p + "mlp.fc1.bias", dtype)
        fc2 = p + "mlp.fc2."
    return VisionBlockWeights(
        norm1_weight=get(p + "norm1.weight", dtype), norm1_bias=get.optional(p + "norm1.bias", dtype),
        norm2_weight=get(p + "norm2.weight", dtype), norm2_bias=get.optional(p + "norm2.bias", dtype),
        qkv_weight=get(p + "attn.qkv.weight", dtype), qkv_bias=get(p + "attn.qkv.bias", dtype),
        proj_weight=get(p + "attn.proj.weight", dtype), proj_bias=get(p + "attn.proj.bias", dtype),
        fc1_weight=fc1_w, fc1_bias=fc1_b,
        fc2_weight=get(fc2 + "weight", dtype), fc2_bias=get(fc2 + "bias", dtype),
    )


def _vision(get: _Loader, config: ModelConfig, dtype: torch.dtype) -> VisionWeights:
    patch = get("visual.patch_embed.proj.weight", dtype)  # [E, C, tp, p, p]
    if patch.shape[1:].numel() != config.vision.patch_dim:
        raise WeightsError(f"visual.patch_embed.proj.weight has shape {list(patch.shape)}, expected "
                           f"{config.vision.patch_dim} inputs per patch")
    gated = config.vision.norm == "rmsnorm"
    return VisionWeights(
        patch_embed=patch.reshape(patch.shape[0], -1),  # [E, C*tp*p*p]: Conv3d(stride=kernel) as matmul
        blocks=[_vision_block(get, i, dtype, gated) for i in range(config.vision.depth)],
        merger_norm_weight=get("visual.merger.ln_q.weight", dtype),
        merger_norm_bias=get.optional("visual.merger.ln_q.bias", dtype),
        merger_fc1_weight=get("visual.merger.mlp.0.weight", dtype),
        merger_fc1_bias=get("visual.merger.mlp.0.bias", dtype),
        merger_fc2_weight=get("visual.merger.mlp.2.weight", dtype),
        merger_fc2_bias=get("visual.merger.mlp.2.bias", dtype),
    )


def load_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", tp: TPGroup = SINGLE_PROCESS) -> ModelWeights:
    """Load a checkpoint directory's weights for `config`, cast to `dtype`, onto `device`.

    The vision tower is cast to vision_dtype_for(dtype) instead (fp16 guard). Raises
    WeightsError naming every missing or unexpected tensor, or a shape that contradicts
    config.json, before reading any data. With tp.world_size > 1 only rank tp.rank's shards are
    read (see the module docstring); parallel.TPSizeError names the sizes the world size does not
    divide.
    """
    sharding.check_tp_sizes(config, tp.world_size)
    reader = CheckpointReader(path)
    _check_names(config, reader)
    _check_shapes(config, reader)
    get = _Loader(reader, device, config, tp)
    embed = get("model.embed_tokens.weight", dtype)
    tied = config.tie_word_embeddings
    language = LanguageWeights(
        embed_tokens=embed,
        layers=[_decoder_layer(get, i, dtype) for i in range(config.text.num_layers)],
        norm=get("model.norm.weight", dtype),
        lm_head=embed if tied else get("lm_head.weight", dtype),
    )
    vdtype = vision_dtype_for(dtype)
    return ModelWeights(language=language, vision=_vision(get, config, vdtype), dtype=dtype,
                        vision_dtype=vdtype)


def _check_shapes(config: ModelConfig, reader: CheckpointReader) -> None:
    """The checkpoint's full shapes of the tensors whose layout the loader (and its shard slices)
    relies on, against config.json."""
    t, v = config.text, config.vision
    p = "model.layers.0."
    checks = {"model.embed_tokens.weight": [t.vocab_size, t.hidden_size],
              "lm_head.weight": [t.vocab_size, t.hidden_size],
              p + "self_attn.q_proj.weight": [t.num_heads * t.head_dim, t.hidden_size],
              p + "self_attn.k_proj.weight": [t.num_kv_heads * t.head_dim, t.hidden_size],
              p + "self_attn.v_proj.weight": [t.num_kv_heads * t.head_dim, t.hidden_size],
              p + "self_attn.o_proj.weight": [t.hidden_size, t.num_heads * t.head_dim],
              p + "mlp.gate_proj.weight": [t.intermediate_size, t.hidden_size],
              p + "mlp.up_proj.weight": [t.intermediate_size, t.hidden_size],
              p + "mlp.down_proj.weight": [t.hidden_size, t.intermediate_size],
              "visual.blocks.0.attn.qkv.weight": [3 * v.num_heads * v.head_dim, v.hidden_size],
              "visual.blocks.0.attn.proj.weight": [v.hidden_size, v.num_heads * v.head_dim]}
    for name, shape in checks.items():
        if name in reader and reader.shape(name) != shape:
            raise WeightsError(f"{name}: shape {reader.shape(name)} does not match config.json ({shape})")
