"""Shared test helpers: the device, dtypes, tolerances, NaN poisoning and Triton-path proofs."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from hypothesis import strategies as st

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.target import Target, current_target

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tolerances relative to the magnitude of the float64 reference, per output dtype:
# one unit of rounding in the output dtype (bf16 stores truncate in the interpreter, so a full
# ulp there), plus room for fp32 accumulation over long reductions.
_REL = {torch.float32: 2e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """(atol, rtol) for comparing an output of `dtype` against float64 math.

    `scale` widens both for ops whose error grows with their reduction (attention, long rows).
    """
    rel = _REL[dtype] * scale
    return rel, 2 * rel


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0) -> None:
    """Assert `actual` (any dtype) matches the float64 `expected64` within `tolerance(dtype)`,
    with atol scaled by the reference's largest magnitude so inputs of any size compare fairly."""
    assert actual.shape == expected64.shape, (actual.shape, expected64.shape)
    assert torch.isfinite(actual).all(), "output has NaN/Inf (poisoned elements left unwritten?)"
    atol, rtol = tolerance(dtype, scale)
    magnitude = max(float(expected64.abs().max()), 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected64.double().cpu(),
                               atol=atol * magnitude, rtol=rtol)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal tensor on DEVICE, from its own generator (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)


def nan_filled(shape, dtype: torch.dtype) -> torch.Tensor:
    """A NaN-filled tensor (e.g. unused KV-cache blocks): any read of it shows in the result."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@contextlib.contextmanager
def expect_triton_launch(op_name: str, times: int = 1):
    """Assert the block ran op `op_name` on its Triton path exactly `times` times."""
    before = _backend.launch_counts[op_name]
    yield
    ran = _backend.launch_counts[op_name] - before
    assert ran == times, f"{op_name}: expected {times} Triton launches, saw {ran}"


def tile_plans() -> st.SearchStrategy[Target]:
    """Attention tile plans to prove the kernels' numbers under: this device's own target (the
    interpreter here) with its query-tile rows and key-tile size drawn from what any target may
    choose, so a target's plan never runs tiles the tests have not seen."""
    base = current_target(DEVICE)
    tiles = st.sampled_from([16, 32, 64])
    return st.builds(lambda key, decode_key, rows: dataclasses.replace(base, key_tile=key, decode_key_tile=decode_key,
                                                                       query_rows=rows),
                     tiles, tiles, st.sampled_from([16, 32, 64, 128]))
