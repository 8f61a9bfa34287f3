"""Shared test helpers: the device, dtypes, tolerances, NaN poisoning and Triton-path proofs."""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from hypothesis import strategies as st

from qwen_vl_triton.kernels import _backend
from qwen_vl_triton.kernels.plans import OPS, TILE_SIZES, AttentionPlan, PlanEntry, PlanTable
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
    interpreter here) with either its default tiles drawn (query-tile rows, key-tile sizes) or a
    device plan table (kernels/plans.py) of two buckets per op and head dim, split at a drawn
    token count, each bucket's tiles drawn from kernels.plans.TILE_SIZES: every tile a target's
    defaults or a committed plan file may choose is one the tests run."""
    base = current_target(DEVICE)
    tiles = st.sampled_from([16, 32, 64])
    defaults = st.builds(lambda key, decode_key, rows: dataclasses.replace(base, key_tile=key,
                                                                           decode_key_tile=decode_key, query_rows=rows),
                         tiles, tiles, st.sampled_from([16, 32, 64, 128]))
    plan = st.builds(AttentionPlan, st.sampled_from(TILE_SIZES), st.sampled_from(TILE_SIZES))
    buckets = [(op, d) for op in OPS for d in HEAD_DIMS_PLANNED]

    def table(split: int, plans: list[tuple[AttentionPlan, AttentionPlan]]) -> Target:
        entries = [PlanEntry(op, d, bound, p) for (op, d), pair in zip(buckets, plans, strict=True)
                   for bound, p in zip((split, 1 << 20), pair, strict=True)]
        return dataclasses.replace(base, plans=PlanTable(tuple(entries)))

    planned = st.builds(table, st.sampled_from([1, 8, 40, 64]),
                        st.lists(st.tuples(plan, plan), min_size=len(buckets), max_size=len(buckets)))
    return defaults | planned


HEAD_DIMS_PLANNED = (64, 80, 128)  # the head dims a drawn plan table covers (tests/kernels/attention_oracle)
