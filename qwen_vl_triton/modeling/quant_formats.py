"""The quantized checkpoint formats, said once: per format and layer type, every tensor a quantized
linear layer L carries (its name L.<suffix>, dtype and shape) and the formula they compute. The
loader (modeling/quantization.py) takes from these tables which tensors a layer must and may have
and checks each one's dtype and shape before reading it; the writer (tools/quantize.py, through
modeling/quant_rounding.py) writes each layer through them, so what it writes is what the loader
reads. A layer has N output channels and K input features; its weight is int8 [N, K].

  ascend (msModelSlim, Huawei's tool; loaded by MindIE and vllm-ascend): a description (JSON) gives
    every tensor its type (FLOAT, or a key of MSMODELSLIM_LAYERS); MODEL_QUANT_TYPE names the
    model's; its other keys are metadata (modeling/quantization.py says which). ASCEND_LAYOUTS are
    the two file namings msModelSlim's savers use. Anti-outlier norms (smooth quant folded into a
    decoder norm N: y = rms_norm(x) * N.weight + N.bias, N.bias fp32 [H]; in older versions
    N.module.weight / N.module.bias beside an unused N.weight) are read by modeling/weights.py: they
    belong to no linear layer.
  compressed-tensors (llm-compressor; loaded by vLLM): config.json's quantization_config gives each
    layer its scheme (modeling/quantization.py parses it); the layer's tensors are those of
    COMPRESSED_TENSORS_LAYERS[scheme].

OUTPUT_FORMATS are the tool's --format choices: a layer table each, and the metadata written beside.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qwen_vl_triton.modeling.linear import Activations

ASCEND, COMPRESSED_TENSORS = "ascend", "compressed-tensors"  # the methods: --quantization values (vLLM's names)
DESCRIPTION_FILE = "quant_model_description.json"  # msModelSlim's (the untyped name): tensor name -> type
MODEL_QUANT_TYPE = "model_quant_type"  # the description's key for the model's type
FLOAT = "FLOAT"  # the description's type of a tensor that is not quantized
N, K = "N", "K"  # in shapes: the layer's output channels, input features

_FLOATS = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors dtype names
_NUMBERS = _FLOATS | {"I8", "I16", "I32", "I64"}


@dataclass(frozen=True)
class Stored:
    """How a tensor's values are stored: the dtypes a reader takes and the one a writer gives them."""

    what: str  # the accepted dtypes in words, for errors
    accepted: frozenset[str]  # safetensors dtype names
    written: torch.dtype | None  # None: the model's float dtype
    float_bits: bool = False  # fp16 models: float32 values as their bit patterns in int64, which is
    # what Ascend's quant matmul takes (msModelSlim's deq_scale)

    def dtype_for(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype a writer stores these values in, for a model in `model_dtype`."""
        if self.float_bits and model_dtype == torch.float16:
            return torch.int64
        return self.written or model_dtype

    def encode(self, values: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
        """`values` as stored for a model in `model_dtype` (float32 bit patterns where float_bits says)."""
        dtype = self.dtype_for(model_dtype)
        if self.float_bits and dtype == torch.int64:
            return values.float().view(torch.int32).to(torch.int64)
        return values.to(dtype)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """The values of a stored tensor (float32 ones again from their int64 bit patterns)."""
        if self.float_bits and stored.dtype == torch.int64:
            return stored.to(torch.int32).view(torch.float32)
        return stored


INT8 = Stored("int8", frozenset({"I8"}), torch.int8)
INT32 = Stored("int32", frozenset({"I32"}), torch.int32)
FLOAT32 = Stored("a float dtype", _FLOATS, torch.float32)
MODEL_FLOAT = Stored("a float dtype", _FLOATS, None)
NUMBER32 = Stored("a float or integer dtype", _NUMBERS, torch.float32)
MODEL_NUMBER = Stored("a float or integer dtype", _NUMBERS, None)
ZERO_POINT = Stored("a float or integer dtype", _NUMBERS, torch.int8)  # compressed-tensors stores int8
DEQ_SCALE = Stored("a float dtype, or int64 holding float32 bits", _FLOATS | {"I64"}, torch.float32, float_bits=True)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a quantized linear layer L: L.<suffix>."""

    suffix: str
    shape: tuple[int | str, ...]  # as written, N and K standing for the layer's sizes (`fits`: what
    # a reader takes)
    dtype: Stored
    required: bool = True
    read: bool = True  # False: a file may carry it, the format does not need it (not checked)
    one_value_too: bool = False  # per output channel, or one value for the layer (compressed-tensors'
    # weight strategy "tensor")

    @property
    def per_channel(self) -> bool:
        """One value per output channel: [N] or [N, 1], a reader taking either."""
        return self.shape in ((N,), (N, 1))

    def size(self, n: int, k: int) -> tuple[int, ...]:
        """The written shape for a layer of n output channels and k input features."""
        return tuple(n if d == N else k if d == K else int(d) for d in self.shape)

    def fits(self, shape: Sequence[int], n: int, k: int) -> bool:
        """Whether a file's `shape` is one a reader takes for a layer of n outputs and k inputs."""
        if self.per_channel:
            return list(shape) in ([n], [n, 1]) or (self.one_value_too and list(shape) in ([1], []))
        if N in self.shape or K in self.shape:
            return list(shape) == list(self.size(n, k))
        return math.prod(shape) == 1  # one value, whatever its shape

    def expected(self, n: int, k: int) -> str:
        """The shapes `fits` takes, in words."""
        if self.per_channel:
            return f"[{n}] or [{n}, 1] (one per output channel)" + (", or [1]" if self.one_value_too else "")
        if N in self.shape or K in self.shape:
            return str(list(self.size(n, k)))
        return "one value per tensor ([1])"


@dataclass(frozen=True)
class LayerFormat:
    """How a format stores one quantized linear layer L of one type, and what its tensors compute."""

    method: str  # ASCEND or COMPRESSED_TENSORS
    kind: str  # the type as the format names it (msModelSlim's description value; else the scheme)
    scheme: Activations  # how the runtime treats the layer's input (modeling.linear.Int8Linear)
    tensors: tuple[TensorSpec, ...]  # L.weight first
    formula: str  # the layer's output from its tensors

    def spec(self, suffix: str) -> TensorSpec:
        """The entry of L.<suffix> (KeyError when the format has no such tensor)."""
        for t in self.tensors:
            if t.suffix == suffix:
                return t
        raise KeyError(f"{self.kind} has no tensor {suffix!r}")

    @property
    def extra(self) -> tuple[TensorSpec, ...]:
        """The tensors besides L.weight."""
        return self.tensors[1:]

    def names(self, prefix: str) -> tuple[list[str], list[str]]:
        """(required, optional) names of the layer's tensors besides its weight, `prefix` being 'L.'."""
        return ([prefix + t.suffix for t in self.extra if t.required],
                [prefix + t.suffix for t in self.extra if not t.required])

    def stored(self, values: dict[str, torch.Tensor], model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`values` by suffix (values["weight"] int8 [N, K], the others any dtype, [N] or [1] or as
        stored) as the format stores them for a model in `model_dtype`: each in its dtype and written
        shape. Every required tensor must be among them, and nothing the format lacks."""
        missing = [t.suffix for t in self.tensors if t.required and t.suffix not in values]
        if missing:
            raise ValueError(f"{self.kind} needs {', '.join(missing)}")
        n, k = values["weight"].shape
        return {s: self.spec(s).dtype.encode(v, model_dtype).reshape(self.spec(s).size(n, k))
                for s, v in values.items()}


WEIGHT = TensorSpec("weight", (N, K), INT8)
FLOAT_BIAS = TensorSpec("bias", (N,), MODEL_FLOAT, required=False)  # the layer's own, when it has one

# msModelSlim: weight scales and offsets float32 [N, 1]
_MS_SCALE = TensorSpec("weight_scale", (N, 1), FLOAT32)
_MS_OFFSET = TensorSpec("weight_offset", (N, 1), NUMBER32, required=False)  # the writer's: zeros
_MS_STATIC = (TensorSpec("input_scale", (1,), MODEL_FLOAT), TensorSpec("input_offset", (1,), MODEL_NUMBER),
              TensorSpec("deq_scale", (N,), DEQ_SCALE), TensorSpec("quant_bias", (N,), INT32))
_PER_TOKEN_FORMULA = "(x_q @ weight.T) * s * weight_scale + bias, x_q = round(x / s), s = max|x| / 127 per token"


def _unread(specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """`specs` as tensors a file may carry that the format does not need."""
    return tuple(dataclasses.replace(t, required=False, read=False) for t in specs)


MSMODELSLIM_LAYERS: dict[str, LayerFormat] = {layer.kind: layer for layer in (
    LayerFormat(ASCEND, "W8A16", Activations.FLOAT, (WEIGHT, _MS_SCALE, _MS_OFFSET, FLOAT_BIAS),
                "x @ ((weight - weight_offset) * weight_scale).T + bias"),
    LayerFormat(ASCEND, "W8A8_DYNAMIC", Activations.PER_TOKEN, (WEIGHT, _MS_SCALE, _MS_OFFSET, FLOAT_BIAS),
                _PER_TOKEN_FORMULA + "; weight_offset zeros (symmetric)"),
    # "PDMIX": per token in prefill, per tensor in decode, both sets of tensors; run per token in both
    # phases here, which its prefill path defines exactly
    LayerFormat(ASCEND, "W8A8_MIX", Activations.PER_TOKEN,
                (WEIGHT, _MS_SCALE, _MS_OFFSET, FLOAT_BIAS, *_unread(_MS_STATIC)), _PER_TOKEN_FORMULA),
    # quant_bias folds the float bias and the offset's correction: L.bias is not used (as vllm-ascend)
    LayerFormat(ASCEND, "W8A8", Activations.PER_TENSOR, (WEIGHT, *_MS_STATIC, *_unread((_MS_SCALE, _MS_OFFSET,
                                                                                         FLOAT_BIAS))),
                "(x_q @ weight.T + quant_bias) * deq_scale, x_q = clamp(round(x / input_scale + input_offset), "
                "-128, 127), input_offset a whole number; deq_scale = input_scale * weight_scale"),
)}

# compressed-tensors: int8 symmetric weights, scales in the model's dtype
_CT_WEIGHTS = (WEIGHT, TensorSpec("weight_scale", (N, 1), MODEL_FLOAT, one_value_too=True),
               TensorSpec("weight_zero_point", (N, 1), ZERO_POINT, required=False, one_value_too=True),  # zeros
               FLOAT_BIAS)
COMPRESSED_TENSORS_LAYERS: dict[Activations, LayerFormat] = {layer.scheme: layer for layer in (
    LayerFormat(COMPRESSED_TENSORS, Activations.FLOAT.value, Activations.FLOAT, _CT_WEIGHTS,
                "x @ (weight * weight_scale).T + bias"),
    LayerFormat(COMPRESSED_TENSORS, Activations.PER_TOKEN.value, Activations.PER_TOKEN, _CT_WEIGHTS,
                _PER_TOKEN_FORMULA),
    LayerFormat(COMPRESSED_TENSORS, Activations.PER_TENSOR.value, Activations.PER_TENSOR,
                (*_CT_WEIGHTS, TensorSpec("input_scale", (1,), MODEL_FLOAT),
                 TensorSpec("input_zero_point", (1,), ZERO_POINT, required=False)),
                "((x_q - input_zero_point) @ weight.T) * input_scale * weight_scale + bias, x_q = "
                "clamp(round(x / input_scale) + input_zero_point, -128, 127), the zero point a whole number"),
)}

# llm-compressor's Qwen-VL recipes: the LM head and the vision tower stay float.
CT_IGNORE = ["lm_head", "re:visual.*", "re:model.visual.*"]


@dataclass(frozen=True)
class AscendLayout:
    """One of msModelSlim's file namings: its description file and its weight files' stem (the
    weights are <stem>.safetensors, or shards <stem>-00001-of-0000n.safetensors listed by
    <stem>.safetensors.index.json). `{type}` stands for the model's type in lower case (w8a8, ...)."""

    name: str  # the tool's --layout choice
    description: str  # the description file's name
    weight_stem: str
    summary: str  # one line for --help

    def files(self, kind: str) -> tuple[str, str]:
        """(description file, weight stem) for a model of type `kind` (a MSMODELSLIM_LAYERS key)."""
        return self.description.format(type=kind.lower()), self.weight_stem.format(type=kind.lower())


ASCEND_LAYOUTS: dict[str, AscendLayout] = {layout.name: layout for layout in (
    AscendLayout("description", DESCRIPTION_FILE, "quant_model_weights",
                 "quant_model_description.json + quant_model_weights*.safetensors: what msModelSlim's current "
                 "saver writes and vllm-ascend reads"),
    AscendLayout("typed", "quant_model_description_{type}.json", "quant_model_weight_{type}",
                 "quant_model_description_<type>.json + quant_model_weight_<type>*.safetensors: the older saver's "
                 "names, which MindIE reads (config.json's quantize picks the description)"),
)}
DEFAULT_LAYOUT = "description"


@dataclass(frozen=True)
class OutputFormat:
    """A format tools/quantize.py writes (its --format): every decoder linear layer as `layer`."""

    name: str
    layer: LayerFormat
    summary: str  # one line for --help

    @property
    def calibrated(self) -> bool:
        """Static activations: their ranges come from running the float model."""
        return self.layer.scheme is Activations.PER_TENSOR

    def files(self, layout: str = DEFAULT_LAYOUT) -> tuple[str | None, str]:
        """(the description file's name, None for compressed-tensors; the weight files' name without
        '.safetensors' and a shard's -0000i-of-0000n) in `layout`, an ASCEND_LAYOUTS key (ascend only)."""
        if self.layer.method != ASCEND:
            return None, "model"
        return ASCEND_LAYOUTS[layout].files(self.layer.kind)

    def config_entries(self) -> dict[str, Any]:
        """What the format adds to config.json: MindIE's "quantize" switch, or compressed-tensors'
        quantization_config (llm-compressor's int8 preset)."""
        if self.layer.method == ASCEND:
            return {"quantize": self.layer.kind.lower()}
        static = self.calibrated
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                   "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}}
        acts = None if self.layer.scheme is Activations.FLOAT else {
            "num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor" if static else "token",
            "dynamic": not static, "group_size": None, "block_structure": None, "actorder": None,
            "observer": "minmax" if static else None, "observer_kwargs": {}}
        return {"quantization_config": {
            "quant_method": COMPRESSED_TENSORS, "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": "int-quantized"}},
            "ignore": CT_IGNORE, "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None}}

    def description(self, types: dict[str, str]) -> dict[str, str] | None:
        """msModelSlim's description (every written tensor's type, given, and model_quant_type); None for
        compressed-tensors."""
        return {MODEL_QUANT_TYPE: self.layer.kind, **types} if self.layer.method == ASCEND else None


OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    OutputFormat("ascend-w8a8", MSMODELSLIM_LAYERS["W8A8"], "msModelSlim W8A8, as MindIE and vllm-ascend load it: "
                 "static per-tensor asymmetric activations (calibrated), deq_scale, quant_bias (the float bias "
                 "folded in)"),
    OutputFormat("ascend-w8a8-dynamic", MSMODELSLIM_LAYERS["W8A8_DYNAMIC"],
                 "msModelSlim W8A8_DYNAMIC: activations quantized per token at run time"),
    OutputFormat("ascend-w8a16", MSMODELSLIM_LAYERS["W8A16"], "msModelSlim W8A16: int8 weights, float activations"),
    OutputFormat("compressed-tensors-w8a8", COMPRESSED_TENSORS_LAYERS[Activations.PER_TOKEN],
                 "llm-compressor's W8A8 int8 preset, as vLLM loads it: per-channel weights, dynamic per-token "
                 "symmetric activations"),
    OutputFormat("compressed-tensors-w8a8-static", COMPRESSED_TENSORS_LAYERS[Activations.PER_TENSOR],
                 "the same with static per-tensor symmetric activations (calibrated)"),
)}
FORMATS = tuple(OUTPUT_FORMATS)  # the --format names, in the order tests and benchmarks run them
