"""The KV cache left unsized takes what the device has left beside the vision tower's peak for its
largest call and the encoder cache. No accelerator here: a stand-in for torch.cuda's memory calls
keeps the ledger (free memory, what is held, the peak a vision call reaches), and the vision tower
itself runs on the CPU; the device's own numbers wait for a GPU or NPU."""

from __future__ import annotations

import pytest
import torch

from qwen_vl_triton.engine import kv_budget
from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.engine.media import MediaLimits

GIB = 1 << 30
BYTES_PER_PATCH = 3000  # what the stand-in says a vision call allocates at its peak, per patch
SMALL_IMAGES = MediaLimits(image_max_pixels=28 * 28 * 64)  # 256 patches: the profiling call stays cheap here


class FakeDeviceMemory:
    """torch.cuda's memory calls over a ledger: `free` bytes after the weights, `held` allocated;
    a vision call (counted in `calls`) peaks at held + BYTES_PER_PATCH per patch."""

    def __init__(self, free: int, held: int):
        self.free, self.held, self.peak, self.calls = free, held, held, []

    def synchronize(self, device=None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def reset_peak_memory_stats(self, device=None) -> None:
        self.peak = self.held

    def memory_allocated(self, device=None) -> int:
        return self.held

    def max_memory_allocated(self, device=None) -> int:
        return self.peak

    def mem_get_info(self, device=None) -> tuple[int, int]:
        return self.free, 80 * GIB

    def vision_call(self, patches: int) -> None:
        self.calls.append(patches)
        self.peak = max(self.peak, self.held + BYTES_PER_PATCH * patches)


@pytest.fixture
def device(monkeypatch, tiny_checkpoint):
    fake = FakeDeviceMemory(free=2 * GIB, held=GIB)
    monkeypatch.setattr(kv_budget, "device_memory_api", lambda device: fake)
    from qwen_vl_triton.modeling.model import QwenVLModel

    encode = QwenVLModel.encode_media

    def encode_and_count(self, pixel_values, grid_thw):
        fake.vision_call(len(pixel_values))
        return encode(self, pixel_values, grid_thw)

    monkeypatch.setattr(QwenVLModel, "encode_media", encode_and_count)
    return fake


@pytest.mark.parametrize(("chunk", "image_pixels"), [(16384, 28 * 28 * 16), (100, 28 * 28 * 300), (7, 28 * 28)])
def test_the_largest_call_is_a_chunk_or_the_largest_image(tiny_checkpoint, chunk, image_pixels):
    llm = LLM(tiny_checkpoint, device="cpu", num_kv_blocks=4)
    t, h, w = kv_budget.largest_vision_call(llm.model, chunk, image_pixels)
    patches = max(chunk, image_pixels // 14**2)
    m = llm.config.vision.spatial_merge_size
    assert t == 1 and h % m == 0 and w % m == 0
    assert h * w <= patches and (patches < 4 * m * m or h * w > patches * 0.8)


def test_an_unsized_cache_takes_the_free_memory_less_the_vision_peak_and_the_encoder_cache(device, tiny_checkpoint):
    chunk, encoder_gb = 1024, 0.25
    llm = LLM(tiny_checkpoint, device="cpu", vision_chunk_patches=chunk, encoder_cache_gb=encoder_gb,
              max_batch_size=4096, media_limits=SMALL_IMAGES)
    (patches,) = device.calls  # one profiling call, of the largest size the engine makes
    assert patches == torch.tensor(kv_budget.largest_vision_call(llm.model, chunk, llm.preprocessor.limits
                                                                 .image_max_pixels)).prod().item()
    budget = 0.85 * device.free - BYTES_PER_PATCH * patches - encoder_gb * GIB
    t = llm.config.text
    per_block = 2 * t.num_layers * llm.blocks.block_size * t.num_kv_heads * t.head_dim * llm.model.dtype.itemsize
    assert llm.blocks.num_blocks == int(budget // per_block)
    assert "vision tower's peak" in llm.kv_budget_note and "encoder cache 0.25 GiB" in llm.kv_budget_note


def test_a_budget_the_vision_peak_leaves_nothing_of_is_refused_by_name(device, tiny_checkpoint):
    device.free = int(0.2 * GIB)
    with pytest.raises(ValueError, match="vision tower's peak.*raise kv_cache_gb"):
        LLM(tiny_checkpoint, device="cpu", encoder_cache_gb=0.25, vision_chunk_patches=64, media_limits=SMALL_IMAGES)


def test_an_explicit_size_profiles_nothing(device, tiny_checkpoint):
    llm = LLM(tiny_checkpoint, device="cpu", kv_cache_gb=0.01)
    assert device.calls == [] and llm.kv_budget_note == "kv_cache_gb 0.01"
