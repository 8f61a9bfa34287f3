"""write_kv_cache on the Triton path: the kept tokens' rows land bit-exactly at their slots,
padding tokens (slot < 0) and every other cache row stay untouched (NaN)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from tests.helpers import DEVICE, DTYPES, expect_triton_launch, nan_filled, randn


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that comparisons are exact (NaN == NaN included)."""
    return x.view({4: torch.int32, 2: torch.int16}[x.element_size()])


def check_write(t, hk, d, block_size, n_blocks, dtype, slot_dtype, seed, skip_every=3, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # k and v as views of a fused [T, (Hq + 2Hk) * D] projection output
        kv = randn(t, 3 * hk * d, dtype=dtype, seed=seed)
        k = kv[:, hk * d : 2 * hk * d].view(t, hk, d)
        v = kv[:, 2 * hk * d :].view(t, hk, d)
    else:
        k = randn(t, hk, d, dtype=dtype, seed=seed)
        v = randn(t, hk, d, dtype=dtype, seed=seed + 1)
    slots = torch.randperm(n_blocks * block_size, generator=g)[:t]
    slots[torch.randperm(t, generator=g)[: t // skip_every]] = -1  # padding tokens
    slots = slots.to(slot_dtype).to(DEVICE)
    k_cache = nan_filled((n_blocks, block_size, hk, d), dtype)
    v_cache = nan_filled((n_blocks, block_size, hk, d), dtype)
    with expect_triton_launch("write_kv_cache"):
        assert kernels.write_kv_cache(k, v, k_cache, v_cache, slots) is None
    # Expected caches: NaN everywhere except each kept token's row.
    want_k = nan_filled(k_cache.shape, dtype)
    want_v = nan_filled(v_cache.shape, dtype)
    keep = slots >= 0
    blocks, offsets = slots[keep].long() // block_size, slots[keep].long() % block_size
    want_k[blocks, offsets] = k[keep]
    want_v[blocks, offsets] = v[keep]
    assert torch.equal(bits(k_cache), bits(want_k))
    assert torch.equal(bits(v_cache), bits(want_v))
    written = ~torch.isnan(k_cache).all(-1).all(-1)  # [NB, BS] rows that changed
    assert int(written.sum()) == int(keep.sum())


@settings(max_examples=12)
@given(t=st.sampled_from([1, 2, 64]) | st.integers(1, 300), hk=st.sampled_from([1, 2, 4, 8]),
       d=st.sampled_from([64, 80, 128]), block_size=st.sampled_from([16, 32, 64, 128]),
       dtype=st.sampled_from(DTYPES), slot_dtype=st.sampled_from([torch.int32, torch.int64]),
       strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_write_kv_cache(t, hk, d, block_size, dtype, slot_dtype, strided, seed):
    n_blocks = t // block_size + 3  # room for every token plus unused blocks
    check_write(t, hk, d, block_size, n_blocks, dtype, slot_dtype, seed, strided=strided)


def test_write_kv_cache_all_padding():
    """Every slot negative: nothing is written."""
    check_write(5, 2, 64, 16, 2, torch.float16, torch.int64, seed=0, skip_every=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache_reference(dtype):
    """The PyTorch reference (the CPU path) writes the same rows."""
    t, hk, d, bs = 40, 2, 80, 16
    k = randn(t, hk, d, dtype=dtype, seed=1)
    v = randn(t, hk, d, dtype=dtype, seed=2)
    slots = torch.randperm(5 * bs)[:t].to(DEVICE)
    slots[::4] = -1
    caches = [nan_filled((5, bs, hk, d), dtype) for _ in range(4)]
    kernels.write_kv_cache(k, v, caches[0], caches[1], slots)
    kernels.write_kv_cache.reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(bits(caches[0]), bits(caches[2]))
    assert torch.equal(bits(caches[1]), bits(caches[3]))
