"""Round-to-nearest int8 quantization of one float linear layer into a format's tensors (the tables
of modeling/quant_formats.py), as tools/quantize.py writes them. Pure math, no files:

  weights      symmetric per output channel: scale = max|w| / 127 (1 / 127 for a zero row), stored
               in the format's dtype, then q = round(w / stored scale), so that q * scale is the
               nearest int8 step to w in what a reader sees
  activations  (static formats) from the calibrated input range [low, high] of the layer:
               msModelSlim asymmetric (scale and offset spanning [-128, 127]), compressed-tensors
               symmetric (scale = max(|low|, |high|) / 127)

benchmarks/quant_accuracy.py sizes its weight-noise control with the same rounding.
"""

from __future__ import annotations

import torch

from qwen_vl_triton.modeling.linear import Activations
from qwen_vl_triton.modeling.quant_formats import ASCEND, LayerFormat


def channel_scales(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric per-output-channel scales [N] of w [N, K], as stored (`dtype`), never zero."""
    amax = w.float().abs().amax(dim=1)
    return (torch.where(amax > 0, amax, torch.ones_like(amax)) / 127.0).to(dtype)


def round_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] = round(w / scale) with the scales [N] as stored (so dequantizing gives them back)."""
    return torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)


def asymmetric_range(low: float, high: float) -> tuple[float, float]:
    """msModelSlim's activation scale and offset for inputs in [low, high] (0 always inside):
    x_q = round(x / scale + offset) spans [-128, 127]."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-8) / 255.0
    return scale, float(min(max(round(-128.0 - low / scale), -128), 127))


def symmetric_scale(low: float, high: float) -> float:
    """compressed-tensors' static activation scale for inputs in [low, high]: x_q = round(x / scale)
    spans [-127, 127]."""
    return max(abs(low), abs(high), 1e-8) / 127.0


def quantize_layer(layer: LayerFormat, w: torch.Tensor, bias: torch.Tensor | None,
                   value_range: tuple[float, float] | None) -> dict[str, torch.Tensor]:
    """Linear layer L as `layer` stores it, by tensor suffix ('weight', 'weight_scale', ...): from its
    float weight w [N, K] (the model's dtype) and float bias [N] (kept as it is, or None); value_range:
    its input's calibrated (low, high), which static activations need."""
    model_dtype = w.dtype
    scale = channel_scales(w, layer.spec("weight_scale").dtype.dtype_for(model_dtype))
    q = round_weight(w, scale)
    values = {"weight": q, "weight_scale": scale}
    if layer.method == ASCEND:
        values["weight_offset"] = torch.zeros_like(scale)  # symmetric weights, as msModelSlim writes them
    if layer.scheme is Activations.PER_TENSOR:
        if value_range is None:
            raise ValueError(f"{layer.kind} needs the layer's calibrated input range")
        stored_as = layer.spec("input_scale").dtype.dtype_for(model_dtype)
        if layer.method == ASCEND:
            input_scale, input_offset = asymmetric_range(*value_range)
            stored_scale = torch.tensor([input_scale], dtype=stored_as)  # deq_scale takes it as stored
            deq = stored_scale.float() * scale.float()  # fp32 [N]
            float_bias = bias.float() if bias is not None else torch.zeros_like(deq)
            # the float bias and the offset's correction folded into the int32 sums
            quant_bias = torch.round(float_bias / deq) - input_offset * q.sum(1, dtype=torch.int64)
            values |= {"input_scale": stored_scale, "input_offset": torch.tensor([input_offset]), "deq_scale": deq,
                       "quant_bias": quant_bias}
        else:
            values["input_scale"] = torch.tensor([symmetric_scale(*value_range)], dtype=stored_as)
    out = layer.stored(values, model_dtype)
    return out | ({"bias": bias} if bias is not None else {})  # as the float checkpoint has it
