"""Per-device plans (kernels/plans.py): the file format and its errors, the bucket lookup, the
committed files, and launches that take the plan of their bucket (tiles, grid and warps checked
on the launch, numbers against float64), for the attention ops and the row ops."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_vl_triton import kernels
from qwen_vl_triton.kernels import activation, attention_paged, attention_varlen, norms, plans
from qwen_vl_triton.kernels.attention_common import query_tile
from qwen_vl_triton.kernels.plans import (
    OPS,
    PROGRAMS_PER_CORE,
    ROW_OPS,
    ROW_TILES,
    STAGES,
    TILE_SIZES,
    WARPS,
    AttentionPlan,
    PlanEntry,
    PlanTable,
    RowPlan,
    parse_plans,
)
from qwen_vl_triton.kernels.target import KNOWN_TARGETS, Work, current_target, rows_per_tile, use_target
from tests.helpers import DEVICE, assert_close, randn
from tests.kernels.attention_oracle import ATTENTION_SCALE, build_paged_cache, cu_seqlens, varlen64
from tests.kernels.test_attention_paged import decode64, prefill64

plan_st = st.builds(AttentionPlan, st.sampled_from(TILE_SIZES), st.sampled_from(TILE_SIZES),
                    st.sampled_from((None, *WARPS)), st.sampled_from((None, *STAGES)))


@st.composite
def tables(draw) -> PlanTable:
    """Tables of a few distinct buckets per (op, head dim)."""
    entries = []
    for op in draw(st.sets(st.sampled_from(OPS), min_size=1)):
        for d in draw(st.sets(st.sampled_from([64, 80, 128]), min_size=1, max_size=2)):
            for bound in draw(st.sets(st.integers(1, 1 << 16), min_size=1, max_size=4)):
                entries.append(PlanEntry(op, d, bound, draw(plan_st)))
    return parse_plans(PlanTable(tuple(entries)).to_json("sm_90", "drawn", "test"), "drawn")


@settings(max_examples=60, deadline=None)
@given(table=tables(), tokens=st.integers(1, 1 << 17))
def test_a_launch_takes_the_smallest_bucket_that_holds_it_else_the_largest(table, tokens):
    round_trip = parse_plans(json.loads(json.dumps(table.to_json("sm_90", "x", "y"))), "again")
    assert round_trip.entries == table.entries
    for op in OPS:
        for d in (64, 80, 128):
            mine = sorted((e for e in table.entries if e.op == op and e.size == d), key=lambda e: e.max_tokens)
            got = table.lookup(op, d, tokens)
            if not mine:
                assert got is None
                continue
            holding = [e for e in mine if e.max_tokens >= tokens]
            assert got == (holding[0] if holding else mine[-1])
            target = dataclasses.replace(KNOWN_TARGETS["sm_90"], plans=table)
            assert target.attention_plan(op, d, tokens) == got.plan
    # a head dim with no entry takes the Target's own defaults
    sm90 = dataclasses.replace(KNOWN_TARGETS["sm_90"], plans=table)
    assert sm90.attention_plan("paged_decode", 256, tokens) == AttentionPlan(sm90.query_rows, sm90.decode_key_tile)
    assert sm90.attention_plan("varlen", 256, tokens) == AttentionPlan(sm90.query_rows, sm90.key_tile)


@pytest.mark.parametrize(("plans_field", "message"), [
    ({"flash": []}, "unknown op 'flash'"),
    ({"rms_norm": [{"width": 3584, "max_tokens": 16, "tile_elements": 3000, "programs_per_core": 4}]},
     r"plans.rms_norm\[0\]: row plan tile_elements=3000"),
    ({"silu_and_mul": [{"width": 18944, "max_tokens": 1, "tile_elements": 4096, "programs_per_core": 3}]},
     "programs_per_core=3"),
    ({"layer_norm": [{"head_dim": 1280, "max_tokens": 1, "tile_elements": 4096, "programs_per_core": 4}]},
     r"unknown keys \['head_dim'\]"),
    ({"rms_norm": [{"width": 3584, "max_tokens": 16, "query_rows": 64, "key_tile": 64}]},
     r"unknown keys \['key_tile', 'query_rows'\]"),
    ({"varlen": [{"head_dim": 80, "max_tokens": 64, "query_rows": 48, "key_tile": 64}]},
     r"plans.varlen\[0\]: attention plan query_rows=48"),
    ({"varlen": [{"head_dim": 80, "max_tokens": 64, "query_rows": 64, "key_tile": 64, "num_warps": 3}]},
     "num_warps=3"),
    ({"varlen": [{"head_dim": 80, "max_tokens": 64, "query_rows": 64, "key_tile": 64, "block_d": 64}]},
     r"unknown keys \['block_d'\]"),
    ({"paged_decode": [{"head_dim": 128, "query_rows": 64, "key_tile": 64}]}, "'max_tokens'"),
    ({"paged_prefill": [{"head_dim": 128, "max_tokens": 8, "query_rows": 64, "key_tile": 64},
                        {"head_dim": 128, "max_tokens": 8, "query_rows": 32, "key_tile": 32}]},
     "two paged_prefill plans for head dim 128 up to 8 tokens"),
])
def test_bad_plan_files_are_named(plans_field, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_plans({"arch": "sm_90", "plans": plans_field}, "plans/sm_90.json")
    assert "plans/sm_90.json" in str(info.value)


def test_a_file_for_another_arch_is_refused_and_no_file_is_no_plans(tmp_path, monkeypatch):
    monkeypatch.setattr(plans, "PLAN_DIR", tmp_path)
    (tmp_path / "sm_90.json").write_text(json.dumps({"arch": "sm_80", "plans": {}}))
    with pytest.raises(ValueError, match="its arch is 'sm_80', not 'sm_90'"):
        plans.committed_plans.__wrapped__("sm_90")
    assert plans.committed_plans.__wrapped__("sm_100") == PlanTable()


def test_committed_plan_files_parse_and_reach_their_targets():
    """Every file in kernels/plans names a known target, parses, and is what that target holds
    (the compile check compiles each entry: compile_check.launches.plan_launches)."""
    for path in sorted(plans.PLAN_DIR.glob("*.json")):
        arch = path.stem
        assert arch in KNOWN_TARGETS, f"{path.name}: no known target {arch}"
        assert KNOWN_TARGETS[arch].plans == plans.committed_plans(arch)
        assert KNOWN_TARGETS[arch].plans.entries, f"{path.name} holds no plan"


class Recorder:
    """Wraps a Triton kernel: records each launch's keyword (constexpr) arguments."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[dict] = []
        self.grids: list[tuple] = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)
        return call


SMALL, LARGE = AttentionPlan(16, 16), AttentionPlan(64, 32)


def two_buckets(op: str, d: int, split: int) -> PlanTable:
    return PlanTable((PlanEntry(op, d, split, SMALL), PlanEntry(op, d, 1 << 20, LARGE)))


@pytest.mark.parametrize(("longest", "plan"), [(20, SMALL), (100, LARGE)])
def test_varlen_launch_takes_its_bucket_plan(monkeypatch, longest, plan):
    recorder = Recorder(attention_varlen._varlen_attention_kernel)
    monkeypatch.setattr(attention_varlen, "_varlen_attention_kernel", recorder)
    lens, d = [longest, 7], 64
    q, k, v = (randn(sum(lens), 2, d, dtype=torch.float16, seed=s) for s in (1, 2, 3))
    with use_target(dataclasses.replace(current_target(DEVICE), plans=two_buckets("varlen", d, 32))):
        out = kernels.varlen_attention(q, k, v, cu_seqlens(lens), longest, causal=True)
    (call,) = recorder.calls
    assert (call["BLOCK_M"], call["BLOCK_N"]) == (query_tile(1, longest, plan.query_rows)[1], plan.key_tile)
    assert_close(out, varlen64(q, k, v, lens, True), torch.float16, scale=ATTENTION_SCALE)


@pytest.mark.parametrize(("batch", "plan"), [(1, SMALL), (3, LARGE)])
def test_paged_decode_and_prefill_take_their_bucket_plans(monkeypatch, batch, plan):
    decode = Recorder(attention_paged._paged_decode_kernel)
    prefill = Recorder(attention_paged._paged_prefill_kernel)
    monkeypatch.setattr(attention_paged, "_paged_decode_kernel", decode)
    monkeypatch.setattr(attention_paged, "_paged_prefill_kernel", prefill)
    d, block_size = 64, 64
    ctx = [90, 41, 7][:batch]
    cache = build_paged_cache(ctx, 1, d, block_size, torch.float16, seed=batch)
    table = PlanTable(two_buckets("paged_decode", d, 2).entries + two_buckets("paged_prefill", d, 2).entries)
    q_lens = [1] * batch  # prefill of one new token each: T == batch, the same bucket as decode
    q = randn(batch, 4, d, dtype=torch.float16, seed=9)
    with use_target(dataclasses.replace(current_target(DEVICE), plans=table)):
        got_decode = kernels.paged_attention(q, cache.k_cache, cache.v_cache, cache.block_tables, cache.context_lens)
        got_prefill = kernels.paged_prefill_attention(q, cache.k_cache, cache.v_cache, cache.block_tables,
                                                      cu_seqlens(q_lens), cache.context_lens)
    assert decode.calls[0]["BLOCK_N"] == plan.key_tile
    assert (prefill.calls[0]["BLOCK_N"], prefill.calls[0]["BLOCK_M"]) == (plan.key_tile,
                                                                          query_tile(4, batch, plan.query_rows)[1])
    assert_close(got_decode, decode64(q, cache), torch.float16, scale=ATTENTION_SCALE)
    assert_close(got_prefill, prefill64(q, cache, q_lens), torch.float16, scale=ATTENTION_SCALE)


# ------------------------------------------------------------------------------------- row plans

row_plan_st = st.builds(RowPlan, st.sampled_from(ROW_TILES), st.sampled_from(PROGRAMS_PER_CORE),
                        st.sampled_from((None, *WARPS)))


def test_row_plans_round_trip_and_default_to_the_target():
    table = PlanTable((PlanEntry("rms_norm", 3584, 16, RowPlan(1024, 8, 2)),
                       PlanEntry("rms_norm", 3584, 1 << 20, RowPlan(16384, 2))))
    again = parse_plans(json.loads(json.dumps(table.to_json("sm_90", "x", "y"))), "again")
    assert again.entries == table.entries
    assert table.to_json("sm_90", "x", "y")["plans"]["rms_norm"][0] == {
        "width": 3584, "max_tokens": 16, "tile_elements": 1024, "programs_per_core": 8, "num_warps": 2}
    sm90 = dataclasses.replace(KNOWN_TARGETS["sm_90"], plans=table)
    assert sm90.row_plan("rms_norm", 3584, 7) == RowPlan(1024, 8, 2)
    assert sm90.row_plan("rms_norm", 3584, 70000) == RowPlan(16384, 2)
    assert sm90.row_plan("rms_norm", 1280, 7) == RowPlan(4096, sm90.programs_per_core[Work.ROWS])  # no entry
    assert sm90.row_warps(1 << 14, RowPlan(1024, 8, 2)) == 2 and sm90.row_warps(1 << 14, RowPlan(1024, 8)) == 8


def rows64(op: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """float64 reference of a row op (x, weight, bias, residual as the op takes them)."""
    x64, w64 = x.double(), w.double()
    if op == "silu_and_mul":
        gate, up = x64.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if op == "layer_norm":
        return torch.nn.functional.layer_norm(x64, (x.shape[-1],), w64, b.double(), 1e-6)
    if op == "add_rms_norm":
        x64 = (x.float() + r.float()).to(x.dtype).double()  # the sum is rounded to x's dtype first
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64


@settings(max_examples=16, deadline=None)
@given(op=st.sampled_from(ROW_OPS), rows=st.integers(1, 70), width=st.sampled_from([48, 200, 1280, 9000]),
       plan=row_plan_st, seed=st.integers(0, 2**31 - 1))
def test_row_ops_take_their_plan_and_keep_their_numbers(op, rows, width, plan, seed):
    """Under a drawn row plan: the launch's tile rows, grid and warps are the plan's, and the
    output matches float64 (the interpreter runs the tile the plan makes)."""
    module = activation if op == "silu_and_mul" else norms
    name = "_silu_and_mul_kernel" if op == "silu_and_mul" else "_norm_kernel"
    recorder = Recorder(getattr(module, name))
    target = dataclasses.replace(current_target(DEVICE), plans=PlanTable((PlanEntry(op, width, 1 << 20, plan),)))
    x = randn(rows, 2 * width if op == "silu_and_mul" else width, dtype=torch.float16, seed=seed)
    w, b = (randn(width, dtype=torch.float16, seed=seed + i) for i in (1, 2))
    r = randn(*x.shape, dtype=torch.float16, seed=seed + 3)
    with pytest.MonkeyPatch.context() as patch, use_target(target):
        patch.setattr(module, name, recorder)
        got = {"rms_norm": lambda: kernels.rms_norm(x, w, 1e-6),
               "layer_norm": lambda: kernels.layer_norm(x, w, b, 1e-6),
               "add_rms_norm": lambda: kernels.add_rms_norm(x, r, w, 1e-6)[0],
               "silu_and_mul": lambda: kernels.silu_and_mul(x)}[op]()
    (call,) = recorder.calls
    block = call["BLOCK"]
    assert call["BLOCK_R"] == rows_per_tile(rows, block, target, plan=plan) and call["BLOCK_R"] * block <= max(
        plan.tile_elements, block)
    assert call["num_warps"] == (plan.num_warps or target.row_warps(call["BLOCK_R"] * block))
    assert recorder.grids[0][0] <= target.cores(Work.ROWS) * plan.programs_per_core
    assert_close(got, rows64(op, x, w, b, r), torch.float16)
