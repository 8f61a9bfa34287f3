"""The ops the models call, each a Triton kernel with a PyTorch reference beside it.

Signatures are the contract of DESIGN.md. Every op picks its backend per call from
QVL_KERNELS (auto|triton|torch, see kernels/_backend.py); `op.reference` is the PyTorch path.
"""

from kernels.activation import silu_and_mul
from kernels.kv_cache import write_kv_cache
from kernels.norms import add_rms_norm, layer_norm, rms_norm
from kernels.paged_attention import paged_attention, paged_prefill_attention
from kernels.rotary import apply_mrope, apply_rope
from kernels.varlen_attention import varlen_attention

__all__ = [
    "add_rms_norm",
    "apply_mrope",
    "apply_rope",
    "layer_norm",
    "paged_attention",
    "paged_prefill_attention",
    "rms_norm",
    "silu_and_mul",
    "varlen_attention",
    "write_kv_cache",
]
