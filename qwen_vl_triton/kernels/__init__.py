"""The ops the models call, each a Triton kernel with a PyTorch reference beside it.

Signatures are the contract of docs/DESIGN.md ("Kernel contracts"). Every op picks its backend
per call from QVL_KERNELS (auto|triton|torch, see kernels/_backend.py); `op.reference` is the
PyTorch path. No op is named like a module of this package (the attention modules are
attention_*), so `import qwen_vl_triton.kernels.<module>` always yields the module.
"""

from qwen_vl_triton.kernels.activation import silu_and_mul
from qwen_vl_triton.kernels.attention_paged import paged_attention, paged_prefill_attention
from qwen_vl_triton.kernels.attention_varlen import varlen_attention
from qwen_vl_triton.kernels.kv_cache import write_kv_cache
from qwen_vl_triton.kernels.norms import add_rms_norm, layer_norm, rms_norm
from qwen_vl_triton.kernels.quant import int8_matmul, quantize_per_tensor, quantize_per_token, w8a16_matmul
from qwen_vl_triton.kernels.rotary import apply_mrope, apply_rope

__all__ = [
    "add_rms_norm",
    "apply_mrope",
    "apply_rope",
    "int8_matmul",
    "layer_norm",
    "paged_attention",
    "paged_prefill_attention",
    "quantize_per_tensor",
    "quantize_per_token",
    "rms_norm",
    "silu_and_mul",
    "varlen_attention",
    "w8a16_matmul",
    "write_kv_cache",
]
