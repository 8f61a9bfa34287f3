"""Quantized checkpoints: which format a folder is in, which layers it quantizes and how, and one
layer's tensors read (this rank's shard) into the modeling.linear.Int8Linear the forward pass calls.

Two formats, detected from the folder (`--quantization` may name one; a mismatch is an error):

  ascend (msModelSlim, Huawei's tool; loaded by MindIE and vllm-ascend): quant_model_description.json
    maps every tensor name to "FLOAT", "W8A8", "W8A8_DYNAMIC" or "W8A16" (and "model_quant_type");
    the weights are in quant_model_weight_<type>*.safetensors. Per quantized linear layer `L`:
      W8A16         L.weight int8 [N, K]; L.weight_scale, L.weight_offset [N] or [N, 1], float:
                    w = (q - weight_offset) * weight_scale
      W8A8_DYNAMIC  L.weight, L.weight_scale (weight_offset zeros): activations per token, symmetric;
                    L.bias float when present
      W8A8_MIX      both sets of tensors (per token in prefill, per tensor in decode); run per token
      W8A8          L.weight; L.input_scale, L.input_offset [1] (fp16 / bf16; offset a whole number);
                    L.deq_scale [N] (float32, or for fp16 models int64 holding float32 bits);
                    L.quant_bias int32 [N]:
                      x_q = clamp(round(x / input_scale + input_offset), -128, 127)
                      out = (x_q @ q.T + quant_bias) * deq_scale
                    quant_bias folds the float bias and the offset's correction, so L.bias, when
                    present, is not used (as vllm-ascend); L.weight_scale / L.weight_offset may be
                    present and are not needed.
    Anti-outlier (smooth quant folded into the norms): a decoder norm N may carry N.bias (fp32 [H]),
    y = rms_norm(x) * N.weight + N.bias, or, in older versions, N.module.weight / N.module.bias
    beside the original N.weight, which is then unused; the linears' tensors already compensate.
  compressed-tensors (llm-compressor; loaded by vLLM): config.json's quantization_config with
    quant_method "compressed-tensors", format "int-quantized", config_groups whose targets
    ("Linear", a layer name, or "re:<regex>") and `ignore` say which layers each scheme covers:
      weights     int8, symmetric, strategy "channel" (L.weight_scale [N, 1]) or "tensor" ([1])
      activations none (W8A16), int8 per token dynamic symmetric (W8A8), or int8 per tensor
                  static (L.input_scale [1], L.input_zero_point [1] when asymmetric); L.bias float.

Supported in the decoder's linear layers (q/k/v, o, gate/up, down); the embedding, the LM head
and the vision tower must be float (both tools' Qwen-VL recipes keep them so), else an error
names them. Fused parts (q/k/v, gate/up) must share a scheme. Not supported, each a clear error:
KV-cache quantization, sparse or packed int4 formats, group-wise scales, asymmetric weights under
W8A8.

Tensor parallelism: a quantized weight is split like its float one; per-output-channel tensors
follow the weight's rows where the layer is column-parallel (q/k/v by heads, gate/up) and are
whole on every rank where it is row-parallel (o, down), except quant_bias, which only rank 0 adds
(the ranks' int32 partial sums add up to the full one).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from qwen_vl_triton.modeling import weight_table as table
from qwen_vl_triton.modeling.config import ModelConfig
from qwen_vl_triton.modeling.linear import Activations, Int8Linear, StaticSegment
from qwen_vl_triton.modeling.weight_table import WeightEntry, canonical_name
from qwen_vl_triton.parallel import sharding
from qwen_vl_triton.parallel.group import TPGroup
from qwen_vl_triton.parallel.sharding import ShardKind

# --quantization values (vLLM's names); msmodelslim is accepted for ascend.
METHODS = ("ascend", "compressed-tensors")
ALIASES = {"msmodelslim": "ascend", "compressed_tensors": "compressed-tensors"}
CHOICES = (*METHODS, *ALIASES)  # what --quantization accepts
DESCRIPTION_FILE = "quant_model_description.json"

# The decoder's linear layers: the only ones a quantized checkpoint may quantize.
QUANTIZABLE = (table.Q_PROJ, table.K_PROJ, table.V_PROJ, table.O_PROJ, table.GATE_PROJ, table.UP_PROJ,
               table.DOWN_PROJ)
# Row-parallel layers: their per-channel tensors are whole on every rank (quant_bias on rank 0).
_SPLITS_INPUT = (ShardKind.ROW, ShardKind.HEADS_IN)


class QuantizationError(ValueError):
    """A quantized checkpoint this loader cannot read, or a --quantization that does not match it."""


@dataclass
class PartTensors:
    """One part of a (possibly fused) linear layer, this rank's rows, normalised to the runtime's
    terms (modeling.linear.Int8Linear)."""

    weight: torch.Tensor  # int8 [n, k]
    channel_scale: torch.Tensor  # fp32 [n]
    int_bias: torch.Tensor | None = None  # int32 [n]
    weight_offset: torch.Tensor | None = None  # fp32 [n]
    input_scale: float | None = None  # W8A8 static
    input_offset: float | None = None
    bias: torch.Tensor | None = None  # float [n] (zeros off rank 0 for a row-parallel layer)


class Reader(Protocol):
    """What a format reads tensors through (modeling.weights.CheckpointReader)."""

    def shape(self, name: str) -> list[int]: ...
    def get(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor: ...
    def __contains__(self, name: str) -> bool: ...


class QuantizedFormat(ABC):
    """A quantized checkpoint's format: per linear layer its scheme, extra tensors and reading."""

    method: str  # one of METHODS

    @abstractmethod
    def describe(self) -> str:
        """One line for logs, e.g. 'ascend (msModelSlim) W8A8'."""

    @abstractmethod
    def scheme(self, weight_name: str, original_name: str) -> Activations | None:
        """The scheme of the linear layer whose weight is `weight_name` (canonical; original_name
        as the file spells it): None when the layer is float."""

    @abstractmethod
    def tensor_names(self, weight_name: str, scheme: Activations) -> tuple[list[str], list[str]]:
        """(required, optional) canonical names of a quantized layer's tensors besides its weight."""

    @abstractmethod
    def read_part(self, reader: Reader, entry: WeightEntry, i: int, scheme: Activations,
                  config: ModelConfig, tp: TPGroup) -> PartTensors:
        """This rank's share of layer `i`'s quantized `entry`."""


# ----------------------------------------------------------------------------- detection


def detect(path: str | Path) -> QuantizedFormat | None:
    """The quantized format of checkpoint folder `path`, or None for a float checkpoint."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if (path / DESCRIPTION_FILE).is_file():
        # authoritative over config.json's "quantize" (MindIE's switch), which may spell the type differently
        return MsModelSlimFormat(json.loads((path / DESCRIPTION_FILE).read_text()))
    quant_config = config.get("quantization_config")
    if quant_config:
        method = quant_config.get("quant_method")
        if method == "compressed-tensors":
            return CompressedTensorsFormat(quant_config)
        raise QuantizationError(f"config.json's quantization_config.quant_method {method!r} is not supported: "
                                f"this loader reads msModelSlim (quant_model_description.json) and "
                                f"compressed-tensors int8 checkpoints")
    if config.get("quantize"):
        raise QuantizationError(f"config.json says quantize={config['quantize']!r} but {path} has no "
                                f"{DESCRIPTION_FILE} (msModelSlim writes one beside its weights)")
    return None


def resolve(path: str | Path, requested: str | None) -> QuantizedFormat | None:
    """The checkpoint's format, checked against a requested --quantization (None: auto-detect)."""
    found = detect(path)
    if requested is None:
        return found
    method = ALIASES.get(requested, requested)
    if method not in METHODS:
        raise QuantizationError(f"--quantization {requested!r} is not one of {', '.join(METHODS)} "
                                f"(or omit it: the format is detected from the checkpoint)")
    if found is None:
        raise QuantizationError(f"--quantization {requested} was given but {path} is a float checkpoint (no "
                                f"{DESCRIPTION_FILE}, no quantization_config in config.json)")
    if found.method != method:
        raise QuantizationError(f"--quantization {requested} does not match the checkpoint, which is "
                                f"{found.describe()}; pass --quantization {found.method} or omit the flag")
    return found


# ----------------------------------------------------------------------------- helpers


def _prefix(weight_name: str) -> str:
    """'model.layers.0.mlp.down_proj.weight' -> 'model.layers.0.mlp.down_proj.'"""
    assert weight_name.endswith(".weight"), weight_name
    return weight_name[: -len("weight")]


def _read(reader: Reader, name: str, spec: sharding.ShardSpec, zeros_dtype: torch.dtype | None = None
          ) -> torch.Tensor:
    shape = reader.shape(name)
    return sharding.read_shard(lambda index: reader.get(name, index), shape, spec, zeros_dtype)


def _channel_spec(entry: WeightEntry, shape: Sequence[int], config: ModelConfig, tp: TPGroup) -> sharding.ShardSpec:
    """How a per-output-channel tensor ([N] or [N, 1]) of `entry`'s layer is split: like the
    weight's rows for a column-parallel layer, whole for a row-parallel one."""
    if entry.shard in _SPLITS_INPUT:
        return sharding.REPLICATED
    return entry.shard_spec(shape, config, tp)


def _per_channel(reader: Reader, name: str, entry: WeightEntry, n_full: int, config: ModelConfig,
                 tp: TPGroup) -> torch.Tensor:
    """A per-output-channel tensor as fp32 [n] (this rank's rows), from [N] or [N, 1]."""
    shape = reader.shape(name)
    if len(shape) not in (1, 2) or shape[0] != n_full or (len(shape) == 2 and shape[1] != 1):
        raise QuantizationError(f"{name}: shape {shape}, expected [{n_full}] or [{n_full}, 1] (one per output channel)")
    return _read(reader, name, _channel_spec(entry, shape, config, tp)).reshape(-1).float()


def _scalar(reader: Reader, name: str) -> float:
    """A per-tensor value ([1] or []) as a Python float."""
    t = reader.get(name)
    if t.numel() != 1:
        raise QuantizationError(f"{name}: shape {list(t.shape)}, expected one value per tensor ([1])")
    return float(t.reshape(-1)[0].float())


def _int8_layer(reader: Reader, entry: WeightEntry, i: int, config: ModelConfig, tp: TPGroup
                ) -> tuple[str, torch.Tensor, int]:
    """Layer i of `entry`: (its tensors' name prefix, this rank's int8 weight, its full output channels).
    That the file stores it as int8 was checked before any data was read (weights._layer_schemes)."""
    name = entry.name(i)
    shape = reader.shape(name)
    return _prefix(name), _read(reader, name, entry.shard_spec(shape, config, tp)), shape[0]


def _bias_spec(entry: WeightEntry, shape: Sequence[int], config: ModelConfig, tp: TPGroup) -> sharding.ShardSpec:
    """How a bias ([N], float or int32) of `entry`'s layer is split: like the weight's rows for a
    column-parallel layer; on rank 0 only for a row-parallel one (the ranks' partial sums add up)."""
    if entry.shard in _SPLITS_INPUT:
        return sharding.first_rank(tp)
    return entry.shard_spec(shape, config, tp)


def _float_bias(reader: Reader, prefix: str, entry: WeightEntry, config: ModelConfig, tp: TPGroup
                ) -> torch.Tensor | None:
    """A quantized layer's float bias L.bias, when the file has one (Qwen's q/k/v; an anti-outlier
    norm bias's correction on the others), split as _bias_spec says."""
    name = prefix + "bias"
    if name not in reader:
        return None
    return _read(reader, name, _bias_spec(entry, reader.shape(name), config, tp))


def _check_offset(value: float, name: str) -> float:
    if value != round(value) or not -128 <= value <= 127:
        raise QuantizationError(f"{name} = {value}: an activation offset must be a whole number in [-128, 127]")
    return value


# ----------------------------------------------------------------------------- msModelSlim


class MsModelSlimFormat(QuantizedFormat):
    """msModelSlim's W8A8 / W8A8_DYNAMIC / W8A16 (see the module docstring)."""

    method = "ascend"
    # W8A8_MIX ("PDMIX": per-token activations in prefill, per-tensor in decode) carries both sets of
    # tensors; it runs per token in both phases here, which its prefill path defines exactly.
    SCHEMES = {"W8A8": Activations.PER_TENSOR, "W8A8_DYNAMIC": Activations.PER_TOKEN,
               "W8A8_MIX": Activations.PER_TOKEN, "W8A16": Activations.FLOAT}
    NOT_LAYERS = ("model_quant_type", "kv_cache_type", "version", "group_size", "model_type")

    def __init__(self, description: dict[str, Any]):
        if description.get("kv_cache_type"):
            raise QuantizationError(f"{DESCRIPTION_FILE}: KV-cache quantization "
                                    f"(kv_cache_type {description['kv_cache_type']!r}) is not supported")
        self.model_quant_type = str(description.get("model_quant_type", "")).upper()
        self.types: dict[str, str] = {}  # canonical tensor name -> its type
        for name, kind in description.items():
            if name in self.NOT_LAYERS or not isinstance(kind, str):
                continue
            kind = kind.upper()
            if kind != "FLOAT" and kind not in self.SCHEMES:
                raise QuantizationError(f"{DESCRIPTION_FILE}: {name} is {kind}; supported: FLOAT, "
                                        f"{', '.join(self.SCHEMES)}")
            self.types[canonical_name(name)] = kind

    def describe(self) -> str:
        kinds = sorted({k for k in self.types.values() if k != "FLOAT"})
        return f"ascend (msModelSlim) {self.model_quant_type or '/'.join(kinds) or 'FLOAT'}"

    def scheme(self, weight_name: str, original_name: str) -> Activations | None:
        kind = self.types.get(weight_name, "FLOAT")
        return None if kind == "FLOAT" else self.SCHEMES[kind]

    def tensor_names(self, weight_name: str, scheme: Activations) -> tuple[list[str], list[str]]:
        p = _prefix(weight_name)
        if scheme is Activations.PER_TENSOR:
            return ([p + s for s in ("input_scale", "input_offset", "deq_scale", "quant_bias")],
                    [p + s for s in ("weight_scale", "weight_offset", "bias")])
        # W8A8_MIX's static tensors are present and not needed here
        return [p + "weight_scale"], [p + s for s in ("weight_offset", "bias", "input_scale", "input_offset",
                                                        "deq_scale", "quant_bias")]

    def read_part(self, reader: Reader, entry: WeightEntry, i: int, scheme: Activations,
                  config: ModelConfig, tp: TPGroup) -> PartTensors:
        p, weight, n_full = _int8_layer(reader, entry, i, config, tp)
        if scheme is not Activations.PER_TENSOR:
            scale = _per_channel(reader, p + "weight_scale", entry, n_full, config, tp)
            offset = (_per_channel(reader, p + "weight_offset", entry, n_full, config, tp)
                      if p + "weight_offset" in reader else None)
            if offset is not None and not bool(offset.any()):
                offset = None
            if offset is not None and scheme is Activations.PER_TOKEN:
                raise QuantizationError(f"{p}weight_offset: asymmetric weights are not supported under W8A8_DYNAMIC")
            return PartTensors(weight, scale, weight_offset=offset, bias=_float_bias(reader, p, entry, config, tp))
        deq_name, bias_name = p + "deq_scale", p + "quant_bias"
        deq = _read(reader, deq_name, _channel_spec(entry, reader.shape(deq_name), config, tp)).reshape(-1)
        if deq.dtype == torch.int64:  # fp16 models: float32 bit patterns in int64 (for Ascend's quant matmul)
            deq = deq.to(torch.int32).view(torch.float32)
        if deq.numel() != weight.shape[0]:
            raise QuantizationError(f"{deq_name}: {deq.numel()} values on this rank, expected {weight.shape[0]}")
        int_bias = _read(reader, bias_name, _bias_spec(entry, reader.shape(bias_name), config, tp),
                         torch.int32).reshape(-1)
        if int_bias.dtype != torch.int32:
            raise QuantizationError(f"{bias_name} is {int_bias.dtype}, expected int32")
        return PartTensors(weight, deq.float(), int_bias=int_bias, input_scale=_scalar(reader, p + "input_scale"),
                           input_offset=_check_offset(_scalar(reader, p + "input_offset"), p + "input_offset"))


# ----------------------------------------------------------------------------- compressed-tensors


@dataclass(frozen=True)
class _Group:
    """One config group of a compressed-tensors quantization_config."""

    targets: tuple[str, ...]
    scheme: Activations


def _matches(patterns: Sequence[str], names: Sequence[str]) -> bool:
    """compressed-tensors' matching: "Linear" (every linear layer here), an exact layer name, or
    're:<regex>' matched from the start of the name."""
    for pattern in patterns:
        if pattern == "Linear":
            return True
        for name in names:
            if pattern.startswith("re:") and re.match(pattern[3:], name) or pattern == name:
                return True
    return False


class CompressedTensorsFormat(QuantizedFormat):
    """compressed-tensors int8 ("int-quantized"), see the module docstring."""

    method = "compressed-tensors"

    def __init__(self, quant_config: dict[str, Any]):
        fmt = quant_config.get("format")
        if fmt != "int-quantized":
            raise QuantizationError(f"compressed-tensors format {fmt!r} is not supported (only 'int-quantized': int8 "
                                    f"weights stored as int8)")
        status = quant_config.get("quantization_status", "compressed")
        if status != "compressed":
            raise QuantizationError(f"compressed-tensors quantization_status {status!r}: only 'compressed' checkpoints "
                                    f"(int8 weights on disk) are supported")
        if quant_config.get("kv_cache_scheme"):
            raise QuantizationError("compressed-tensors kv_cache_scheme: KV-cache quantization is not supported")
        self.ignore = tuple(quant_config.get("ignore") or ())
        self.groups = [self._group(name, g) for name, g in (quant_config.get("config_groups") or {}).items()]
        if not self.groups:
            raise QuantizationError("compressed-tensors quantization_config has no config_groups")

    @staticmethod
    def _group(name: str, group: dict[str, Any]) -> _Group:
        def bad(what: str) -> QuantizationError:
            return QuantizationError(f"compressed-tensors config group {name!r}: {what} is not supported "
                                     f"(supported: int8 symmetric per-channel or per-tensor weights; activations "
                                     f"none, int8 dynamic per token symmetric, or int8 static per tensor)")

        w = group.get("weights") or {}
        if w.get("num_bits") != 8 or w.get("type", "int") != "int" or w.get("dynamic"):
            raise bad(f"weights {w}")
        if not w.get("symmetric", True):
            raise bad("asymmetric weights")
        if w.get("strategy") not in ("channel", "tensor"):
            raise bad(f"weight strategy {w.get('strategy')!r}")
        a = group.get("input_activations")
        if group.get("output_activations"):
            raise bad("output activation quantization")
        if a is None:
            scheme = Activations.FLOAT
        elif a.get("num_bits") != 8 or a.get("type", "int") != "int":
            raise bad(f"input activations {a}")
        elif a.get("dynamic") and a.get("strategy") == "token":
            if not a.get("symmetric", True):
                raise bad("asymmetric dynamic activations")
            scheme = Activations.PER_TOKEN
        elif not a.get("dynamic") and a.get("strategy") == "tensor":
            scheme = Activations.PER_TENSOR
        else:
            raise bad(f"input activations with strategy {a.get('strategy')!r}, dynamic {a.get('dynamic')!r}")
        return _Group(tuple(group.get("targets") or ()), scheme)

    def describe(self) -> str:
        return "compressed-tensors int8 " + "/".join(sorted({g.scheme.value for g in self.groups}))

    def _group_of(self, weight_name: str, original_name: str) -> _Group | None:
        layer_names = (_prefix(original_name)[:-1], _prefix(weight_name)[:-1])
        if _matches(self.ignore, layer_names):
            return None
        return next((g for g in self.groups if _matches(g.targets, layer_names)), None)

    def scheme(self, weight_name: str, original_name: str) -> Activations | None:
        group = self._group_of(weight_name, original_name)
        return None if group is None else group.scheme

    def tensor_names(self, weight_name: str, scheme: Activations) -> tuple[list[str], list[str]]:
        p = _prefix(weight_name)
        required, optional = [p + "weight_scale"], [p + "weight_zero_point", p + "bias"]
        if scheme is Activations.PER_TENSOR:
            required.append(p + "input_scale")
            optional.append(p + "input_zero_point")
        return required, optional

    def read_part(self, reader: Reader, entry: WeightEntry, i: int, scheme: Activations,
                  config: ModelConfig, tp: TPGroup) -> PartTensors:
        p, weight, n_full = _int8_layer(reader, entry, i, config, tp)
        if p + "weight_zero_point" in reader and bool(reader.get(p + "weight_zero_point").any()):
            raise QuantizationError(f"{p}weight_zero_point: asymmetric weights are not supported")
        if reader.shape(p + "weight_scale") in ([1], []):  # strategy "tensor": one scale for the layer
            scale = torch.full((weight.shape[0],), _scalar(reader, p + "weight_scale"))
        else:
            scale = _per_channel(reader, p + "weight_scale", entry, n_full, config, tp)
        bias = _float_bias(reader, p, entry, config, tp)
        if scheme is not Activations.PER_TENSOR:
            return PartTensors(weight, scale, bias=bias)
        input_scale = _scalar(reader, p + "input_scale")
        zero_point = _check_offset(_scalar(reader, p + "input_zero_point"), p + "input_zero_point") \
            if p + "input_zero_point" in reader else 0.0
        # x_q = round(x / s) + zp: the sums carry zp * sum_k q, taken off on each rank for its own k
        int_bias = (-int(zero_point) * weight.sum(1, dtype=torch.int32)).to(torch.int32) if zero_point else None
        return PartTensors(weight, scale * input_scale, int_bias=int_bias, input_scale=input_scale,
                           input_offset=zero_point, bias=bias)


# ----------------------------------------------------------------------------- fusing parts


def fuse(parts: Sequence[PartTensors], scheme: Activations, device: torch.device | str,
         dtype: torch.dtype) -> Int8Linear:
    """One Int8Linear of a layer's parts (q | k | v, gate | up, or one), their rows in order; its
    float bias (if any part has one) in `dtype`, the model's."""
    def rows_of(field: str, field_dtype: torch.dtype) -> torch.Tensor | None:
        """The parts' optional per-row tensor `field`, joined (zeros for a part without one), or None."""
        if all(getattr(p, field) is None for p in parts):
            return None
        return torch.cat([getattr(p, field).to(field_dtype) if getattr(p, field) is not None
                          else torch.zeros(p.weight.shape[0], dtype=field_dtype) for p in parts]).to(device)

    weight = torch.cat([p.weight for p in parts]).to(device)
    scale = torch.cat([p.channel_scale for p in parts]).to(device, torch.float32)
    segments: tuple[StaticSegment, ...] = ()
    if scheme is Activations.PER_TENSOR:
        bounds, start = [], 0
        for p in parts:  # merge neighbours that quantize their input alike
            stop = start + p.weight.shape[0]
            if bounds and bounds[-1][2:] == (p.input_scale, p.input_offset):
                bounds[-1] = (bounds[-1][0], stop, p.input_scale, p.input_offset)
            else:
                bounds.append((start, stop, p.input_scale, p.input_offset))
            start = stop
        segments = tuple(StaticSegment(a, b, torch.tensor([s], dtype=torch.float32, device=device),
                                       torch.tensor([o], dtype=torch.float32, device=device))
                         for a, b, s, o in bounds)
    return Int8Linear(weight, scale, scheme, int_bias=rows_of("int_bias", torch.int32),
                      weight_offset=rows_of("weight_offset", torch.float32), segments=segments,
                      bias=rows_of("bias", dtype))
