"""Quantized checkpoints: which format a folder is in, which layers it quantizes and how, and one
layer's tensors read (this rank's shard) into the modeling.linear.Int8Linear the forward pass calls.
Each format's tensors (names, dtypes, shapes) and formulas are modeling/quant_formats.py's tables;
every tensor a layer reads is checked against its entry (file header) before any data is read.

Two formats, detected from the folder (`--quantization` may name one; a mismatch is an error):

  ascend (msModelSlim, Huawei's tool; loaded by MindIE and vllm-ascend): a description maps every
    tensor name to "FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A8_MIX" or "W8A16", beside the weights, in
    either of msModelSlim's namings (quant_formats.ASCEND_LAYOUTS):
      quant_model_description.json + quant_model_weights*.safetensors (or, older,
        quant_model_weight*.safetensors), and
      quant_model_description_<type>.json + quant_model_weight_<type>*.safetensors,
    each sharded or not, with or without a <stem>.safetensors.index.json (whose shards must all be
    there). The weights are every *.safetensors of the folder; when several descriptions lie there,
    config.json's "quantize" (MindIE's switch) must pick one typed description, whose own
    quant_model_weight_<type>*.safetensors are then the weights.
    Tensor entries and metadata: a key of the description is a tensor entry when it names (after
    canonical_name) a tensor of the weight files, or when its value is a string and the key ends in
    a tensor suffix of the format (.weight, .bias, .weight_scale, .input_offset, ...: TENSOR_SUFFIXES)
    and so names a tensor the files lack, which is harmless. Every other key is metadata, kept as
    written (MsModelSlimFormat.metadata) and never an error: model_quant_type, version, group_size,
    the arguments msModelSlim's example scripts merge in (w_bit, a_bit, act_method, anti_method,
    is_dynamic, dev_type, disable_names, ...), and any a later version adds. Errors: a tensor entry
    of a type not supported, an int8 tensor the description does not list, a description that lists
    no tensor of the files, and KV-cache quantization (a non-empty kv_cache_type).
  compressed-tensors (llm-compressor; loaded by vLLM): config.json's quantization_config with
    quant_method "compressed-tensors", format "int-quantized", config_groups whose targets
    ("Linear", a layer name, or "re:<regex>") and `ignore` say which layers each scheme covers:
    weights int8 symmetric per channel or per tensor; activations none (W8A16), int8 per token
    dynamic symmetric (W8A8), or int8 per tensor static, with or without a zero point.

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
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from qwen_vl_triton.modeling import weight_table as table
from qwen_vl_triton.modeling.config import ModelConfig
from qwen_vl_triton.modeling.linear import Activations, Int8Linear, StaticSegment
from qwen_vl_triton.modeling.quant_formats import (
    ASCEND,
    ASCEND_LAYOUTS,
    COMPRESSED_TENSORS,
    COMPRESSED_TENSORS_LAYERS,
    DESCRIPTION_FILE,
    FLOAT,
    MODEL_QUANT_TYPE,
    MSMODELSLIM_LAYERS,
    LayerFormat,
    TensorSpec,
)
from qwen_vl_triton.modeling.weight_table import WeightEntry, canonical_name
from qwen_vl_triton.parallel import sharding
from qwen_vl_triton.parallel.group import TPGroup
from qwen_vl_triton.parallel.sharding import ShardKind

logger = logging.getLogger(__name__)

# --quantization values (vLLM's names); msmodelslim is accepted for ascend.
METHODS = (ASCEND, COMPRESSED_TENSORS)
ALIASES = {"msmodelslim": ASCEND, "compressed_tensors": COMPRESSED_TENSORS}
CHOICES = (*METHODS, *ALIASES)  # what --quantization accepts

# The decoder's linear layers: the only ones a quantized checkpoint may quantize.
QUANTIZABLE = (table.Q_PROJ, table.K_PROJ, table.V_PROJ, table.O_PROJ, table.GATE_PROJ, table.UP_PROJ,
               table.DOWN_PROJ)
# The suffixes of msModelSlim's tensors (L.weight, L.bias, L.weight_scale, ...): a description key
# ending in one, with a string value, is a tensor entry even when the files lack the tensor.
TENSOR_SUFFIXES = tuple(sorted({"." + t.suffix for layer in MSMODELSLIM_LAYERS.values() for t in layer.tensors}))
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
    def dtype_name(self, name: str) -> str: ...
    def get(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor: ...
    def __contains__(self, name: str) -> bool: ...


class QuantizedFormat(ABC):
    """A quantized checkpoint's format: per linear layer its scheme, extra tensors and reading."""

    method: str  # one of METHODS
    weight_files: tuple[str, ...] | None = None  # the files holding the weights; None: the folder's usual ones

    @abstractmethod
    def describe(self) -> str:
        """One line for logs, e.g. 'ascend (msModelSlim) W8A8'."""

    def details(self) -> str:
        """describe(), and where the format was read from and what else it says, for a verbose report."""
        return self.describe()

    @abstractmethod
    def scheme(self, weight_name: str, original_name: str) -> Activations | None:
        """The scheme of the linear layer whose weight is `weight_name` (canonical; original_name
        as the file spells it): None when the layer is float."""

    @abstractmethod
    def layout(self, weight_name: str, scheme: Activations) -> LayerFormat:
        """The table of the quantized layer whose weight is `weight_name` (canonical), of `scheme`."""

    def tensor_names(self, weight_name: str, scheme: Activations) -> tuple[list[str], list[str]]:
        """(required, optional) canonical names of a quantized layer's tensors besides its weight."""
        return self.layout(weight_name, scheme).names(_prefix(weight_name))

    @abstractmethod
    def read_part(self, reader: Reader, entry: WeightEntry, i: int, scheme: Activations,
                  config: ModelConfig, tp: TPGroup) -> PartTensors:
        """This rank's share of layer `i`'s quantized `entry`."""


# ----------------------------------------------------------------------------- detection


def detect(path: str | Path) -> QuantizedFormat | None:
    """The quantized format of checkpoint folder `path`, or None for a float checkpoint."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if (found := _find_description(path, config.get("quantize"))) is not None:
        return MsModelSlimFormat.read(*found)
    quant_config = config.get("quantization_config")
    if quant_config:
        method = quant_config.get("quant_method")
        if method == COMPRESSED_TENSORS:
            return CompressedTensorsFormat(quant_config)
        raise QuantizationError(f"config.json's quantization_config.quant_method {method!r} is not supported: "
                                f"this loader reads msModelSlim (quant_model_description.json) and "
                                f"compressed-tensors int8 checkpoints")
    if config.get("quantize"):
        raise QuantizationError(f"config.json says quantize={config['quantize']!r} but {path} has no msModelSlim "
                                f"description ({_DESCRIPTIONS}, which msModelSlim writes beside its weights)")
    return None


_TYPED = re.compile(r"quant_model_description_(?P<type>\w+)\.json")  # the typed layout's description
_DESCRIPTIONS = f"{DESCRIPTION_FILE} or quant_model_description_<type>.json"


def _find_description(path: Path, quantize: Any) -> tuple[Path, tuple[str, ...]] | None:
    """(the msModelSlim description of folder `path`, its weight files), or None without one.

    One description is the checkpoint's whatever config.json's "quantize" says (the description
    names the types), its weights every *.safetensors of the folder. Of several, the typed one whose
    <type> is "quantize" is, and any other choice is an error; its weights are then its own
    quant_model_weight_<type>*.safetensors. Each index (quant_model_weight*.safetensors.index.json)
    of those weights must list only files that are there."""
    found = sorted(p for p in path.glob("quant_model_description*.json")
                   if p.name == DESCRIPTION_FILE or _TYPED.fullmatch(p.name))
    if not found:
        return None
    files = sorted(p.name for p in path.glob("*.safetensors"))
    indexes = sorted(path.glob("quant_model_weight*.safetensors.index.json"))
    description, pattern = found[0], "*.safetensors"
    if len(found) > 1:
        wanted = str(quantize or "").lower()
        chosen = [m for p in found if (m := _TYPED.fullmatch(p.name)) and m["type"].lower() == wanted]
        if len(chosen) != 1:
            said = f"says quantize={quantize!r}, which matches none of them" if quantize else "has no quantize"
            raise QuantizationError(f"{path} has {len(found)} msModelSlim descriptions "
                                    f"({', '.join(p.name for p in found)}) and config.json {said}: set config.json's "
                                    f"quantize to the <type> of the quant_model_description_<type>.json to load, or "
                                    f"keep one description")
        description = path / chosen[0].string
        stem = ASCEND_LAYOUTS["typed"].weight_stem.format(type=chosen[0]["type"])
        pattern = f"{stem}*.safetensors"
        files = [f for f in files if f == f"{stem}.safetensors" or f.startswith(f"{stem}-")]
        indexes = [i for i in indexes if i.name == f"{stem}.safetensors.index.json"]
    if not files:
        raise QuantizationError(f"{path} has {description.name} but no weight files ({pattern}) beside it")
    for index in indexes:
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - set(files))
        if missing:
            raise QuantizationError(f"{index} lists {len(missing)} weight file(s) that {path} lacks: "
                                    f"{', '.join(missing[:5])} (an incomplete download or copy?)")
    return description, tuple(files)


def _stored_dtypes(folder: Path, files: Sequence[str]) -> dict[str, str]:
    """Canonical name -> safetensors dtype name ('I8', 'BF16', ...) of every tensor in `files` of
    `folder`, from the file headers alone (no data is read)."""
    dtypes: dict[str, str] = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as handle:
            names = handle.keys()  # safe_open handles are not iterable
            dtypes.update({canonical_name(k): handle.get_slice(k).get_dtype() for k in names})
    return dtypes


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
                                f"{_DESCRIPTIONS}, no quantization_config in config.json)")
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


def _per_channel(reader: Reader, prefix: str, spec: TensorSpec, entry: WeightEntry, config: ModelConfig,
                 tp: TPGroup) -> torch.Tensor:
    """Per-output-channel tensor `prefix` + spec.suffix ([N] or [N, 1], checked by _int8_layer) as its
    fp32 values [n], this rank's rows."""
    name = prefix + spec.suffix
    stored = _read(reader, name, _channel_spec(entry, reader.shape(name), config, tp))
    return spec.dtype.decode(stored).reshape(-1).float()


def _scalar(reader: Reader, name: str) -> float:
    """A per-tensor value (one value, checked by _int8_layer) as a Python float."""
    return float(reader.get(name).reshape(-1)[0].float())


def _int8_layer(reader: Reader, entry: WeightEntry, i: int, layout: LayerFormat, config: ModelConfig,
                tp: TPGroup) -> tuple[str, torch.Tensor]:
    """Layer i of `entry`: (its tensors' name prefix, this rank's int8 weight). First, from the file
    headers, every tensor of it the format reads against `layout`'s dtype and shape (that the
    weight is int8 was checked before any data was read: weights._layer_schemes)."""
    name = entry.name(i)
    shape, p = reader.shape(name), _prefix(name)
    for spec in layout.extra:
        if not spec.read or p + spec.suffix not in reader:
            continue
        dtype, got = reader.dtype_name(p + spec.suffix), reader.shape(p + spec.suffix)
        if dtype not in spec.dtype.accepted:
            raise QuantizationError(f"{p}{spec.suffix} is {dtype}, expected {spec.dtype.what}")
        if not spec.fits(got, *shape):
            raise QuantizationError(f"{p}{spec.suffix}: shape {got}, expected {spec.expected(*shape)}")
    return p, _read(reader, name, entry.shard_spec(shape, config, tp))


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
    """msModelSlim's description: every tensor's type, each quantized one's layer table
    quant_formats.MSMODELSLIM_LAYERS[type]; the description's other keys are `metadata` (the rule:
    the module docstring)."""

    method = ASCEND

    def __init__(self, description: Mapping[str, Any], stored: Mapping[str, str], source: str = DESCRIPTION_FILE,
                 weight_files: tuple[str, ...] | None = None):
        """description: the file's JSON object; stored: canonical name -> safetensors dtype of every
        tensor in the weight files; source: the description's file name, for messages."""
        self.source = source
        self.weight_files = weight_files
        self.types: dict[str, str] = {}  # canonical tensor name -> its type
        self.metadata: dict[str, Any] = {}  # every other key, as written
        supported = (FLOAT, *MSMODELSLIM_LAYERS)
        for key, value in description.items():
            name = canonical_name(key)
            if name not in stored and not (isinstance(value, str) and key.endswith(TENSOR_SUFFIXES)):
                self.metadata[key] = value
                continue
            kind = value.upper() if isinstance(value, str) else value
            if kind not in supported:
                raise QuantizationError(f"{source}: tensor {key} has type {value!r}, which is not supported; "
                                        f"supported types: {', '.join(supported)}")
            self.types[name] = kind
        if self.metadata.get("kv_cache_type"):
            raise QuantizationError(f"{source}: KV-cache quantization "
                                    f"(kv_cache_type {self.metadata['kv_cache_type']!r}) is not supported")
        if not self.types.keys() & stored.keys():
            raise QuantizationError(f"{source} lists no tensor of the checkpoint's weight files (its "
                                    f"{len(self.types)} tensor entries and the files' {len(stored)} tensors share no "
                                    f"name): is it another model's description?")
        unlisted = sorted(n for n, dtype in stored.items() if dtype == "I8" and n not in self.types)
        if unlisted:
            raise QuantizationError(f"{source} does not list {len(unlisted)} int8 tensor(s) of the weight files, "
                                    f"so their quantization type is unknown: {', '.join(unlisted[:5])}")
        self.model_quant_type = str(self.metadata.get(MODEL_QUANT_TYPE, "")).upper()

    @classmethod
    def read(cls, description: Path, files: tuple[str, ...]) -> MsModelSlimFormat:
        """The format of msModelSlim description file `description` over its weight `files` (names in
        its folder); logs what it says besides the tensors (INFO, one line)."""
        data = json.loads(description.read_text())
        if not isinstance(data, dict):
            raise QuantizationError(f"{description} holds a JSON {type(data).__name__}, not an object mapping tensor "
                                    f"names to their types")
        fmt = cls(data, _stored_dtypes(description.parent, files), description.name, files)
        logger.info("%s: %s", description, fmt.details())
        return fmt

    def describe(self) -> str:
        kinds = sorted({k for k in self.types.values() if k != FLOAT})
        return f"ascend (msModelSlim) {self.model_quant_type or '/'.join(kinds) or FLOAT}"

    def details(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.metadata.items())
        files = f"{len(self.weight_files)} weight file(s)" if self.weight_files is not None else "its weight files"
        return f"{self.describe()} from {self.source} and {files}; metadata: {shown or 'none'}"

    def scheme(self, weight_name: str, original_name: str) -> Activations | None:
        kind = self.types.get(weight_name, FLOAT)
        return None if kind == FLOAT else MSMODELSLIM_LAYERS[kind].scheme

    def layout(self, weight_name: str, scheme: Activations) -> LayerFormat:
        return MSMODELSLIM_LAYERS[self.types[weight_name]]

    def read_part(self, reader: Reader, entry: WeightEntry, i: int, scheme: Activations,
                  config: ModelConfig, tp: TPGroup) -> PartTensors:
        layout = self.layout(entry.name(i), scheme)
        p, weight = _int8_layer(reader, entry, i, layout, config, tp)
        if scheme is not Activations.PER_TENSOR:
            scale = _per_channel(reader, p, layout.spec("weight_scale"), entry, config, tp)
            offset = (_per_channel(reader, p, layout.spec("weight_offset"), entry, config, tp)
                      if p + "weight_offset" in reader else None)
            if offset is not None and not bool(offset.any()):
                offset = None
            if offset is not None and scheme is Activations.PER_TOKEN:
                raise QuantizationError(f"{p}weight_offset: asymmetric weights are not supported under {layout.kind}")
            return PartTensors(weight, scale, weight_offset=offset, bias=_float_bias(reader, p, entry, config, tp))
        int_bias = _read(reader, p + "quant_bias", _bias_spec(entry, reader.shape(p + "quant_bias"), config, tp),
                         torch.int32).reshape(-1)
        return PartTensors(weight, _per_channel(reader, p, layout.spec("deq_scale"), entry, config, tp),
                           int_bias=int_bias, input_scale=_scalar(reader, p + "input_scale"),
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
    """compressed-tensors int8 ("int-quantized"): each layer's scheme from the config groups, its
    table quant_formats.COMPRESSED_TENSORS_LAYERS[scheme]."""

    method = COMPRESSED_TENSORS

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

    def layout(self, weight_name: str, scheme: Activations) -> LayerFormat:
        return COMPRESSED_TENSORS_LAYERS[scheme]

    def read_part(self, reader: Reader, entry: WeightEntry, i: int, scheme: Activations,
                  config: ModelConfig, tp: TPGroup) -> PartTensors:
        layout = self.layout(entry.name(i), scheme)
        p, weight = _int8_layer(reader, entry, i, layout, config, tp)
        if p + "weight_zero_point" in reader and bool(reader.get(p + "weight_zero_point").any()):
            raise QuantizationError(f"{p}weight_zero_point: asymmetric weights are not supported")
        if reader.shape(p + "weight_scale") in ([1], []):  # strategy "tensor": one scale for the layer
            scale = torch.full((weight.shape[0],), _scalar(reader, p + "weight_scale"))
        else:
            scale = _per_channel(reader, p, layout.spec("weight_scale"), entry, config, tp)
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
