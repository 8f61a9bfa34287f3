"""How much memory the KV cache may take when the user does not say (kv_cache_gb unset).

On an accelerator (CUDA, or an Ascend NPU through torch_npu, which mirrors torch.cuda's memory
calls): 85% of the memory free once the weights are loaded, less what the engine needs beside
the cache, measured before the cache exists:
- the vision tower's peak activations for its largest call: a video chunk of
  `vision_chunk_patches` patches, or the largest image the media limits allow (an image is
  encoded in one call), whichever is larger. One call on random pixels is run and the device's
  peak allocation over it is read;
- the encoder cache's budget (embeddings kept for repeated media).
On the CPU: 4 GiB (the process shares the machine's memory; pass kv_cache_gb to change it).

Unmeasured on a device so far (no GPU or NPU was lent while it was written): the arithmetic is
tested on the CPU against a stand-in for the device's memory calls.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from qwen_vl_triton.modeling.model import QwenVLModel

CPU_BUDGET_BYTES = 4 << 30
FREE_FRACTION = 0.85  # of the memory free after the weights (MindIE and vLLM leave a similar margin)


def device_memory_api(device: torch.device) -> ModuleType | None:
    """torch.cuda / torch.npu for an accelerator (its mem_get_info, memory_allocated,
    max_memory_allocated, reset_peak_memory_stats, synchronize, empty_cache); None on the CPU."""
    if device.type == "cpu":
        return None
    api = getattr(torch, device.type, None)
    if api is None or not hasattr(api, "mem_get_info"):
        raise RuntimeError(f"cannot query the memory of device {device}: pass kv_cache_gb")
    return api


def largest_vision_call(model: QwenVLModel, chunk_patches: int, image_max_pixels: int) -> tuple[int, int, int]:
    """The grid (1, h, w) of the largest vision call the engine can make: h, w multiples of the
    merge size, h * w close to max(chunk_patches, the largest image's patches) from below."""
    vision = model.config.vision
    patches = max(chunk_patches, image_max_pixels // vision.patch_size**2)
    m = vision.spatial_merge_size
    side = max(1, math.isqrt(patches // (m * m)))  # merged tokens per side of a near-square grid
    return 1, side * m, max(1, patches // (side * m * m)) * m


def profile_vision_peak(model: QwenVLModel, grid: tuple[int, int, int], api: ModuleType) -> int:
    """Bytes the vision tower allocates at its peak, beyond what was held before, for one call on
    a `grid` of random pixels (collective under tensor parallelism: every rank calls it)."""
    device = model.device
    api.synchronize(device)
    api.empty_cache()
    api.reset_peak_memory_stats(device)
    held = api.memory_allocated(device)
    t, h, w = grid
    pixels = torch.randn(t * h * w, model.config.vision.patch_dim, device=device)
    model.encode_media(pixels, torch.tensor([grid]))
    api.synchronize(device)
    peak = api.max_memory_allocated(device) - held
    del pixels
    api.empty_cache()
    return peak


def kv_cache_budget(model: QwenVLModel, *, chunk_patches: int, image_max_pixels: int,
                    encoder_cache_bytes: int) -> tuple[float, str]:
    """(bytes the KV cache may take, a line saying how that was found) for the model's device."""
    api = device_memory_api(model.device)
    if api is None:
        return CPU_BUDGET_BYTES, f"{CPU_BUDGET_BYTES / (1 << 30):.0f} GiB on the CPU"
    grid = largest_vision_call(model, chunk_patches, image_max_pixels)
    vision_peak = profile_vision_peak(model, grid, api)
    free, _ = api.mem_get_info(model.device)
    budget = FREE_FRACTION * free - vision_peak - encoder_cache_bytes
    gib = 1 << 30
    return budget, (f"{FREE_FRACTION:.0%} of {free / gib:.2f} GiB free after the weights, less the vision "
                    f"tower's peak {vision_peak / gib:.2f} GiB (a {grid} call) and the encoder cache "
                    f"{encoder_cache_bytes / gib:.2f} GiB")
