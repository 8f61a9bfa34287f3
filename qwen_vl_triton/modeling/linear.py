"""Linear layers as the forward passes call them: `linear(x, weight, bias)`.

A weight is either a float tensor [N, K] (torch.nn.functional.linear's layout) or a quantized
layer object called as `weight(x, bias)`:

  Int8Linear         int8 weights [N, K] with per-output-channel scales, in one of three schemes
                     (checkpoint formats: modeling/quant_formats.py):
                       W8A16         activations stay float; weights dequantized in the kernel
                                     (kernels.w8a16_matmul), optionally asymmetric (weight_offset);
                       W8A8 dynamic  activations quantized per token, symmetric
                                     (kernels.quantize_per_token, then kernels.int8_matmul);
                       W8A8 static   activations quantized with one scale and offset per tensor
                                     (msModelSlim's W8A8: kernels.quantize_per_tensor), an int32 bias
                                     added to the int32 sums, then the per-channel dequant scale.
  DequantizedLinear  the same layer as float math: activations quantized and dequantized again,
                     weights dequantized to fp32. `dequantized(weights)` swaps every Int8Linear of
                     a model for one: the reference the int8 kernels must match (exactness tests,
                     the accuracy benchmark).

Fused layers (qkv, gate_up) concatenate their parts' rows. Under W8A8 static each part keeps
its own activation scale and offset (a checkpoint may calibrate q, k and v apart): parts with
equal ones share one quantization and one matmul (`StaticSegment`), otherwise each runs on its
rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch
import torch.nn.functional as F

from qwen_vl_triton import kernels


class Activations(Enum):
    """How a quantized layer treats its input activations."""

    FLOAT = "W8A16"  # not quantized
    PER_TOKEN = "W8A8 dynamic"  # symmetric int8, one scale per row, computed per call
    PER_TENSOR = "W8A8 static"  # int8 with one calibrated scale and offset (zero point)


@dataclass(frozen=True)
class StaticSegment:
    """Rows [start, stop) of a W8A8-static layer whose input is quantized with one scale / offset:
    q = clamp(round(x / scale + offset), -128, 127)."""

    start: int
    stop: int
    scale: torch.Tensor  # fp32 [1], > 0
    offset: torch.Tensor  # fp32 [1], a whole number in [-128, 127]


class LinearOp(Protocol):
    """A layer `linear` calls instead of F.linear: x [T, K] -> [T, N] in x's dtype."""

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...


Weight = torch.Tensor | LinearOp


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] -> [T, N]: F.linear for a float weight [N, K], else the quantized layer's own call."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    return weight(x, bias)


@dataclass
class Int8Linear:
    """An int8 linear layer (one process's shard under tensor parallelism). N out, K in.

    channel_scale multiplies each output column after the sum: the weight scale (W8A16, W8A8
    dynamic) or msModelSlim's deq_scale = input scale * weight scale (W8A8 static). int_bias is added
    to the int32 sums before that (W8A8 static: the float bias and the activation offset's
    correction, folded; zeros on all but rank 0 for a row-parallel layer, whose partial sums are
    added up after).
    """

    weight: torch.Tensor  # int8 [N, K]
    channel_scale: torch.Tensor  # fp32 [N]
    activations: Activations
    int_bias: torch.Tensor | None = None  # int32 [N] (W8A8 static)
    weight_offset: torch.Tensor | None = None  # fp32 [N] (W8A16: w = (q - offset) * scale)
    segments: tuple[StaticSegment, ...] = ()  # W8A8 static: the rows of each activation scale
    bias: torch.Tensor | None = None  # [N] the layer's own float bias, added to a call's
    unit_scale: torch.Tensor | None = field(default=None, init=False, repr=False)  # fp32 [1] of 1.0: a
    # static matmul's row scale, made once (no allocation in the step: graph capture replays it)

    def __post_init__(self):
        if self.activations is Activations.PER_TENSOR:
            if not self.segments or self.segments[0].start != 0 or self.segments[-1].stop != self.weight.shape[0]:
                raise ValueError("a W8A8 static layer needs activation segments covering its rows")
            self.unit_scale = torch.ones(1, dtype=torch.float32, device=self.weight.device)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.bias is not None:
            bias = self.bias if bias is None else bias + self.bias
        if self.activations is Activations.FLOAT:
            return kernels.w8a16_matmul(x, self.weight, self.channel_scale, bias, w_offset=self.weight_offset)
        if self.activations is Activations.PER_TOKEN:
            q, scale = kernels.quantize_per_token(x)
            return kernels.int8_matmul(q, self.weight, scale, self.channel_scale, bias=bias, out_dtype=x.dtype)
        outs = []
        for seg in self.segments:
            rows = slice(seg.start, seg.stop)
            q = kernels.quantize_per_tensor(x, seg.scale, seg.offset)
            outs.append(kernels.int8_matmul(
                q, self.weight[rows], self.unit_scale, self.channel_scale[rows],
                int_bias=None if self.int_bias is None else self.int_bias[rows],
                bias=None if bias is None else bias[rows], out_dtype=x.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass
class DequantizedLinear:
    """An Int8Linear as fp32 float math (the exactness reference): what the int8 kernels compute,
    up to float rounding.

        W8A16         x @ ((q - offset) * scale).T
        W8A8 dynamic  (q_x * s_x) @ (q * scale).T                     q_x, s_x: quantize_per_token(x)
        W8A8 static   ((q_x - o) * s) @ (q * deq / s).T + (int_bias + o * sum_k q) * deq
                      q_x = clamp(round(x / s + o)): the same value as the int path's
                      (q_x @ q.T + int_bias) * deq, rewritten as dequantized activations times
                      dequantized weights plus a float bias.
    """

    weight: torch.Tensor  # fp32 [N, K], dequantized
    activations: Activations
    bias: torch.Tensor | None  # fp32 [N]: the layer's own (W8A8 static: its int bias and offset
    # correction, dequantized, added)
    segments: tuple[StaticSegment, ...] = ()

    @classmethod
    def of(cls, layer: Int8Linear) -> DequantizedLinear:
        q = layer.weight.float()
        own_bias = None if layer.bias is None else layer.bias.float()
        if layer.activations is Activations.FLOAT:
            offset = 0.0 if layer.weight_offset is None else layer.weight_offset[:, None]
            return cls((q - offset) * layer.channel_scale[:, None], layer.activations, own_bias)
        if layer.activations is Activations.PER_TOKEN:
            return cls(q * layer.channel_scale[:, None], layer.activations, own_bias)
        weight, bias = torch.empty_like(q), torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
        int_bias = layer.int_bias.float() if layer.int_bias is not None else torch.zeros_like(bias)
        for seg in layer.segments:
            rows = slice(seg.start, seg.stop)
            deq = layer.channel_scale[rows]
            weight[rows] = q[rows] * (deq / seg.scale)[:, None]
            bias[rows] = (int_bias[rows] + seg.offset * q[rows].sum(1)) * deq
        return cls(weight, layer.activations, bias if own_bias is None else bias + own_bias, layer.segments)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.activations is Activations.FLOAT:
            xs = [x.float()]
        elif self.activations is Activations.PER_TOKEN:
            q, scale = kernels.quantize_per_token.reference(x)
            xs = [q.float() * scale[..., None]]
        else:
            xs = [(kernels.quantize_per_tensor.reference(x, s.scale, s.offset).float() - s.offset) * s.scale
                  for s in self.segments]
        rows = [slice(s.start, s.stop) for s in self.segments] or [slice(None)]
        out = torch.cat([F.linear(xi, self.weight[r]) for xi, r in zip(xs, rows, strict=True)], dim=-1)
        for b in (self.bias, bias):
            if b is not None:
                out = out + b.float()
        return out.to(x.dtype)


def dequantized(weights):
    """A copy of a dataclass of weights (ModelWeights or any part of it) with every Int8Linear
    replaced by its DequantizedLinear; tensors are shared, not copied."""
    if isinstance(weights, Int8Linear):
        return DequantizedLinear.of(weights)
    if isinstance(weights, list):
        return [dequantized(w) for w in weights]
    if dataclasses.is_dataclass(weights) and not isinstance(weights, type):
        return dataclasses.replace(weights, **{f.name: dequantized(getattr(weights, f.name))
                                               for f in dataclasses.fields(weights) if f.init})
    return weights


def weight_bytes(weights) -> int:
    """Bytes of every tensor a dataclass of weights holds (shared tensors, like tied embeddings,
    counted once)."""
    seen: set[int] = set()

    def walk(w) -> int:
        if isinstance(w, torch.Tensor):
            if w.data_ptr() in seen:
                return 0
            seen.add(w.data_ptr())
            return w.numel() * w.element_size()
        if isinstance(w, list | tuple):
            return sum(walk(v) for v in w)
        if dataclasses.is_dataclass(w) and not isinstance(w, type):
            return sum(walk(getattr(w, f.name)) for f in dataclasses.fields(w))
        return 0

    return walk(weights)
