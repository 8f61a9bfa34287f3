"""Safetensors checkpoints -> plain dataclasses of tensors, in the layout the forward passes use.

Reading goes through one lazy function, `CheckpointReader.get(name, index)`: the files are
memory-mapped (safetensors.safe_open) and only the asked-for tensor, or the asked-for slice of
it (`index`, a tuple of slices, via get_slice), is read. A tensor-parallel loader can therefore
read just its shard of every weight.

Which tensors exist, under which names, with which shapes and tensor-parallel splits, is said
once, in modeling/weight_table.py; this module reads tensors by its entries. Names are normalised
to the hub's layout (model.embed_tokens.*, model.layers.*, model.norm.*, lm_head.*, visual.*);
checkpoints saved by transformers >= 4.52 use model.language_model.* and model.visual.*; both load.

Layout changes made at load time (why: fewer, larger matmuls and the kernels' input layouts):
  - q/k/v projections are concatenated into one qkv weight [(Hq + 2 Hk) * D, hidden] (+ bias);
  - gate/up projections into one gate_up weight [2 * I, hidden], the [gate | up] layout that
    kernels.silu_and_mul takes (Qwen2.5-VL's vision MLP too, with its biases);
  - the Conv3d patch embedding [E, C, tp, p, p] becomes a matmul weight [E, C * tp * p * p]
    over the processor's flattened patches (stride == kernel, so the convolution is a matmul).
Linear weights stay [out, in] (torch.nn.functional.linear's layout).

Quantized checkpoints (msModelSlim W8A8 / W8A16, compressed-tensors int8; the format is detected,
modeling/quantization.py reads it): each quantized decoder linear layer becomes a
modeling.linear.Int8Linear in place of its float weight, its parts fused the same way; everything
else loads as above.

Tensor parallelism (a TPGroup with world_size > 1): every tensor is read as its ShardSpec
(the table entry's ShardKind, made a slice by parallel/sharding.py) says, through get_slice, so a
rank reads only its part: q/k/v by heads and gate/up column-parallel (each sliced before fusing, so
the fused qkv is [q_r | k_r | v_r] and gate_up [gate_r | up_r]), o_proj / down_proj and the ViT's
proj / fc2 / merger fc2 row-parallel (their biases on rank 0 only), the embedding and LM head by
vocabulary rows (padded), everything else replicated.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from qwen_vl_triton.modeling import quantization
from qwen_vl_triton.modeling import weight_table as table
from qwen_vl_triton.modeling.config import ModelConfig
from qwen_vl_triton.modeling.linear import Activations, Weight
from qwen_vl_triton.modeling.quantization import QuantizationError, QuantizedFormat
from qwen_vl_triton.modeling.weight_table import WeightEntry, canonical_name
from qwen_vl_triton.parallel import sharding
from qwen_vl_triton.parallel.group import SINGLE_PROCESS, TPGroup


class WeightsError(ValueError):
    """The checkpoint's tensors do not match what the config describes."""


class CheckpointReader:
    """Lazy, per-tensor access to the *.safetensors of one checkpoint directory.

    Handles a single model.safetensors, a sharded checkpoint with model.safetensors.index.json,
    or any set of *.safetensors files. Tensors are addressed by canonical name.
    files: the weight files to read (names in `path`), as a quantized format finds them
    (QuantizedFormat.weight_files: msModelSlim's, whatever index a float checkpoint's files left
    beside them); None: the index's files, else every *.safetensors.
    """

    def __init__(self, path: str | Path, files: Sequence[str] | None = None):
        path = Path(path)
        index_file = path / "model.safetensors.index.json"
        if files is not None:
            files = sorted(files)
        elif index_file.is_file():
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

    def dtype_name(self, name: str) -> str:
        """Tensor `name`'s safetensors dtype ('BF16', 'I8', ...), from the file header."""
        f, original = self._locate(name)
        return self._handles[f].get_slice(original).get_dtype()

    def original_name(self, name: str) -> str:
        """Tensor `name` as the file spells it (e.g. transformers >= 4.52's nested layout)."""
        return self._locate(name)[1]

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
    qkv_weight: Weight  # [(Hq + 2 Hk) * D, H]  (float, or an Int8Linear of that shape)
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hk) * D]; None when quantized (the Int8Linear holds its own)
    o_weight: Weight  # [H, Hq * D]
    post_norm: torch.Tensor  # [H]
    gate_up_weight: Weight  # [2 I, H]   rows: gate then up
    down_weight: Weight  # [H, I]
    input_norm_bias: torch.Tensor | None = None  # [H] msModelSlim's anti-outlier norm bias, added after
    post_norm_bias: torch.Tensor | None = None  # [H] the norm (quantized checkpoints only)


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
    """Everything a forward pass reads. `vision` is in `vision_dtype` (see vision_dtype_for).
    quantization: the checkpoint's quantized format (None: float)."""

    language: LanguageWeights
    vision: VisionWeights
    dtype: torch.dtype
    vision_dtype: torch.dtype
    quantization: QuantizedFormat | None = None


def vision_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The ViT's compute dtype for a model dtype.

    fp16 activations overflow inside some vision towers (reported for Qwen2.5-VL-3B: the
    residual stream of late blocks passes 65504 and turns into inf/NaN), so an fp16 model runs
    its ViT in bf16 (fp32's range, half its memory); the merger's output is cast back to fp16.
    """
    return torch.bfloat16 if dtype == torch.float16 else dtype


# ----------------------------------------------------------------------------- loading


class _Loader:
    """Reads tensors by table entry, only this rank's shard of each, casting and moving them."""

    def __init__(self, reader: CheckpointReader, device: torch.device | str, config: ModelConfig,
                 tp: TPGroup, quant: QuantizedFormat | None = None,
                 schemes: dict[str, Activations] | None = None):
        self.reader = reader
        self.device = device
        self.config = config
        self.tp = tp
        self.quant = quant
        self.schemes = schemes or {}  # canonical weight name -> scheme, for the quantized layers

    def _read(self, entry: WeightEntry, dtype: torch.dtype, i: int | None) -> torch.Tensor:
        """This rank's shard of `entry` as read, on the host."""
        name = entry.name(i)
        shape = self.reader.shape(name)
        spec = entry.shard_spec(shape, self.config, self.tp)
        return sharding.read_shard(lambda index: self.reader.get(name, index), shape, spec, dtype)

    def __call__(self, entry: WeightEntry, dtype: torch.dtype, i: int | None = None) -> torch.Tensor:
        """This rank's shard of `entry` (of layer / block `i` when the entry repeats)."""
        return self._read(entry, dtype, i).to(device=self.device, dtype=dtype)

    def cat(self, entries: Iterable[WeightEntry], dtype: torch.dtype, i: int | None = None) -> torch.Tensor:
        """This rank's slices of several tensors, concatenated along dim 0 (fused qkv, gate_up). Joined
        on the host, then cast and moved once: no per-part copies on the device."""
        return torch.cat([self._read(e, dtype, i) for e in entries], dim=0).to(device=self.device, dtype=dtype)

    def optional(self, entry: WeightEntry, dtype: torch.dtype, i: int | None = None) -> torch.Tensor | None:
        """This rank's slice of `entry`, or None when the config's checkpoints lack it (optional biases)."""
        return self(entry, dtype, i) if entry.present(self.config) else None

    def linear(self, parts: Sequence[WeightEntry], dtype: torch.dtype, i: int,
               biases: Sequence[WeightEntry] = ()) -> tuple[Weight, torch.Tensor | None]:
        """Decoder layer i's linear layer made of `parts` (fused in order) and its bias (None without
        `biases`): float tensors, or an Int8Linear when the checkpoint quantizes it (every part
        alike: checked before any data is read)."""
        scheme = self.schemes.get(parts[0].name(i))
        if scheme is None:
            return self.cat(parts, dtype, i), (self.cat(biases, dtype, i) if biases else None)
        assert self.quant is not None  # a quantized layer reads its own float bias, if it keeps one
        return quantization.fuse([self.quant.read_part(self.reader, e, i, scheme, self.config, self.tp)
                                  for e in parts], scheme, self.device, dtype), None

    def norm(self, entry: WeightEntry, dtype: torch.dtype, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder norm `entry` of layer i and its anti-outlier bias, if the checkpoint has one
        (msModelSlim: y = rms_norm(x) * weight + bias; older versions name the pair module.weight /
        module.bias beside the original weight, which is then not used)."""
        name = entry.name(i)
        stem = name[: -len("weight")]
        for weight_name, bias_name in ((stem + "module.weight", stem + "module.bias"), (name, stem + "bias")):
            if weight_name in self.reader:
                weight = self.reader.get(weight_name).to(self.device, dtype)
                bias = self.reader.get(bias_name).to(self.device, dtype) if bias_name in self.reader else None
                return weight, bias
        raise WeightsError(f"checkpoint has no tensor {name!r}")


# Parts the loader fuses: they must share a scheme.
_FUSED = ((table.Q_PROJ, table.K_PROJ, table.V_PROJ), (table.GATE_PROJ, table.UP_PROJ))


def _layer_schemes(config: ModelConfig, reader: CheckpointReader, quant: QuantizedFormat | None
                   ) -> dict[str, Activations]:
    """Canonical weight name -> scheme of every quantized linear layer, checked against the files:
    only the decoder's linear layers may be quantized, fused parts alike, and a layer's weight is
    int8 exactly when its format says it is quantized."""
    schemes: dict[str, Activations] = {}
    for entry in table.WEIGHTS:
        linear_layer = entry.local.endswith("weight") and entry not in (table.EMBED_TOKENS, table.PATCH_EMBED) \
            and len(entry.shape(config)) == 2
        for name in entry.names(config) if linear_layer else []:
            if name not in reader:
                continue
            scheme = quant.scheme(name, reader.original_name(name)) if quant is not None else None
            stored_int8 = reader.dtype_name(name) == "I8"
            if scheme is not None and entry not in quantization.QUANTIZABLE:
                raise QuantizationError(f"{name} is quantized ({scheme.value}); only the decoder's linear layers "
                                        f"may be (the embedding, LM head and vision tower must stay float)")
            if scheme is not None and not stored_int8:
                raise QuantizationError(f"{name} is {reader.dtype_name(name)}, but the checkpoint's quantization "
                                        f"metadata says it is {scheme.value} (an int8 weight)")
            if scheme is None and stored_int8:
                raise QuantizationError(f"{name} is int8, but "
                                        + (f"{quant.describe()} marks it float" if quant else
                                           "the checkpoint has no quantization metadata (an msModelSlim description "
                                           "or config.json's quantization_config)"))
            if scheme is not None:
                schemes[name] = scheme
    for group in _FUSED:
        for i in range(config.text.num_layers):
            found = {e.name(i): schemes.get(e.name(i)) for e in group}
            if len(set(found.values())) > 1:
                raise QuantizationError("parts of one fused layer must share a quantization scheme: " + ", ".join(
                    f"{n} {s.value if s else 'float'}" for n, s in found.items()))
    return schemes


def _check_names(config: ModelConfig, reader: CheckpointReader, quant: QuantizedFormat | None = None,
                 schemes: dict[str, Activations] | None = None) -> None:
    """Fail with every missing and unexpected tensor named, before reading any data."""
    expected = set(table.expected_names(config))
    present = {n for n in reader.names() if not n.endswith(table.IGNORED_SUFFIXES)}
    optional = table.optional_names(config)
    for name, scheme in (schemes or {}).items():
        assert quant is not None
        required, extra = quant.tensor_names(name, scheme)
        expected.update(required)
        optional.update(extra)  # L.bias among them: a quantized layer reads its own, when the file has one
    if quant is not None:  # anti-outlier norm biases, and older msModelSlim's module.weight / module.bias
        for entry in (table.INPUT_NORM, table.POST_ATTN_NORM):
            for name in entry.names(config):
                stem = name[: -len("weight")]
                optional.update({stem + "bias", stem + "module.weight", stem + "module.bias"})
    missing = sorted(expected - present - optional)
    unexpected = sorted(present - expected - optional)
    if missing or unexpected:
        lines = []
        if missing:
            lines.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:20])}")
        raise WeightsError("checkpoint does not match config.json: " + "; ".join(lines))


def _check_shapes(config: ModelConfig, reader: CheckpointReader) -> None:
    """Every tensor's full shape (from the file headers) against the one config.json implies, so
    the fused layouts and every rank's slices are right."""
    for entry in table.WEIGHTS:
        shape = entry.shape(config)
        for name in entry.names(config):
            if name in reader and reader.shape(name) != shape:
                raise WeightsError(f"{name}: shape {reader.shape(name)} does not match config.json ({shape})")


def _decoder_layer(get: _Loader, i: int, dtype: torch.dtype) -> DecoderLayerWeights:
    """Decoder layer i, q/k/v and gate/up fused (shapes in DecoderLayerWeights)."""
    qkv, qkv_bias = get.linear([table.Q_PROJ, table.K_PROJ, table.V_PROJ], dtype, i,
                               biases=[table.Q_PROJ_BIAS, table.K_PROJ_BIAS, table.V_PROJ_BIAS])
    input_norm, input_norm_bias = get.norm(table.INPUT_NORM, dtype, i)
    post_norm, post_norm_bias = get.norm(table.POST_ATTN_NORM, dtype, i)
    return DecoderLayerWeights(
        input_norm=input_norm,
        input_norm_bias=input_norm_bias,
        qkv_weight=qkv,
        qkv_bias=qkv_bias,
        o_weight=get.linear([table.O_PROJ], dtype, i)[0],
        post_norm=post_norm,
        post_norm_bias=post_norm_bias,
        gate_up_weight=get.linear([table.GATE_PROJ, table.UP_PROJ], dtype, i)[0],
        down_weight=get.linear([table.DOWN_PROJ], dtype, i)[0],
    )


def _vision_block(get: _Loader, i: int, dtype: torch.dtype) -> VisionBlockWeights:
    """ViT block i; Qwen2.5-VL's gate/up fused into fc1 (shapes in VisionBlockWeights)."""
    if table.VIT_GATE.present(get.config):  # Qwen2.5-VL: SiLU(gate) * up, biases on all three
        fc1_w = get.cat([table.VIT_GATE, table.VIT_UP], dtype, i)
        fc1_b = get.cat([table.VIT_GATE_BIAS, table.VIT_UP_BIAS], dtype, i)
        fc2_w, fc2_b = get(table.VIT_DOWN, dtype, i), get(table.VIT_DOWN_BIAS, dtype, i)
    else:  # Qwen2-VL: fc2(QuickGELU(fc1(x)))
        fc1_w, fc1_b = get(table.VIT_FC1, dtype, i), get(table.VIT_FC1_BIAS, dtype, i)
        fc2_w, fc2_b = get(table.VIT_FC2, dtype, i), get(table.VIT_FC2_BIAS, dtype, i)
    return VisionBlockWeights(
        norm1_weight=get(table.VIT_NORM1, dtype, i), norm1_bias=get.optional(table.VIT_NORM1_BIAS, dtype, i),
        norm2_weight=get(table.VIT_NORM2, dtype, i), norm2_bias=get.optional(table.VIT_NORM2_BIAS, dtype, i),
        qkv_weight=get(table.VIT_QKV, dtype, i), qkv_bias=get(table.VIT_QKV_BIAS, dtype, i),
        proj_weight=get(table.VIT_PROJ, dtype, i), proj_bias=get(table.VIT_PROJ_BIAS, dtype, i),
        fc1_weight=fc1_w, fc1_bias=fc1_b, fc2_weight=fc2_w, fc2_bias=fc2_b,
    )


def _vision(get: _Loader, config: ModelConfig, dtype: torch.dtype) -> VisionWeights:
    """The vision tower, its Conv3d patch embedding flattened to a matmul weight (shapes in VisionWeights)."""
    patch = get(table.PATCH_EMBED, dtype)  # [E, C, tp, p, p]
    return VisionWeights(
        patch_embed=patch.reshape(patch.shape[0], -1),  # [E, C*tp*p*p]: Conv3d(stride=kernel) as matmul
        blocks=[_vision_block(get, i, dtype) for i in range(config.vision.depth)],
        merger_norm_weight=get(table.MERGER_NORM, dtype),
        merger_norm_bias=get.optional(table.MERGER_NORM_BIAS, dtype),
        merger_fc1_weight=get(table.MERGER_FC1, dtype),
        merger_fc1_bias=get(table.MERGER_FC1_BIAS, dtype),
        merger_fc2_weight=get(table.MERGER_FC2, dtype),
        merger_fc2_bias=get(table.MERGER_FC2_BIAS, dtype),
    )


def load_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str = "cpu", tp: TPGroup = SINGLE_PROCESS,
                 quantization_method: str | None = None) -> ModelWeights:
    """Load a checkpoint directory's weights for `config`, cast to `dtype`, onto `device`.

    quantization_method: None detects the checkpoint's format (modeling/quantization.py); a
    method name ('ascend', 'compressed-tensors') must match it, else QuantizationError. Quantized
    layers keep their int8 weights and scales; `dtype` is their activations' dtype.

    The vision tower is cast to vision_dtype_for(dtype) instead (fp16 guard). Raises
    WeightsError naming every missing or unexpected tensor, or a shape that contradicts
    config.json, before reading any data. With tp.world_size > 1 only rank tp.rank's shards are
    read (see the module docstring); parallel.TPSizeError names the sizes the world size does not
    divide.
    """
    table.check_tp_sizes(config, tp.world_size)
    quant = quantization.resolve(path, quantization_method)
    reader = CheckpointReader(path, quant.weight_files if quant is not None else None)
    schemes = _layer_schemes(config, reader, quant)
    _check_names(config, reader, quant, schemes)
    _check_shapes(config, reader)
    get = _Loader(reader, device, config, tp, quant, schemes)
    embed = get(table.EMBED_TOKENS, dtype)
    language = LanguageWeights(
        embed_tokens=embed,
        layers=[_decoder_layer(get, i, dtype) for i in range(config.text.num_layers)],
        norm=get(table.FINAL_NORM, dtype),
        lm_head=embed if config.tie_word_embeddings else get(table.LM_HEAD, dtype),
    )
    vdtype = vision_dtype_for(dtype)
    return ModelWeights(language=language, vision=_vision(get, config, vdtype), dtype=dtype,
                        vision_dtype=vdtype, quantization=quant)
