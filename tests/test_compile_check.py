"""The compile check (`make compile-check`): its launch plan, its readings of the compilers'
reports, and, in a subprocess without the interpreter, real compiles for sm_90 that pass for the
launchers' plan and fail for a plan that spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qwen_vl_triton import kernels
from qwen_vl_triton.benchmarks.compile_check.ascend import planned_ub_bytes, uses_cube
from qwen_vl_triton.benchmarks.compile_check.launches import BLOCK_SIZES, all_launches, rank_heads, released_models
from qwen_vl_triton.benchmarks.compile_check.report import KernelResources, TargetReport, Variant, programs_per_sm

REPO = Path(__file__).resolve().parents[1]
ASCEND_PYTHON = REPO / ".venv-ascend" / "bin" / "python"


def test_launch_plan_covers_every_checkpoint_block_size_dtype_and_op():
    launches = all_launches()
    models = released_models()
    assert {"Qwen2-VL-2B", "Qwen2.5-VL-3B", "Qwen2-VL-7B", "Qwen2.5-VL-32B", "Qwen2.5-VL-72B"} <= set(models)
    for name in models:
        mine = [launch for launch in launches if launch.model.startswith(name + " ")]
        assert {launch.dtype for launch in mine} == {torch.float16, torch.bfloat16}
        assert {"paged_attention", "paged_prefill_attention", "write_kv_cache", "apply_mrope", "apply_rope",
                "varlen_attention", "silu_and_mul", "add_rms_norm"} <= {launch.op for launch in mine}
        for bs in BLOCK_SIZES:
            assert any(f"BS={bs}" in launch.shape for launch in mine if launch.op == "paged_prefill_attention")
    assert {launch.op for launch in launches if "ViT" in launch.model} >= {"layer_norm", "rms_norm", "apply_rope"}
    assert set(kernels.__all__) <= {launch.op for launch in launches}  # every public op is planned


def test_rank_heads_follow_the_sharding_rules():
    assert rank_heads(28, 4, 2) == (14, 2)
    assert rank_heads(16, 2, 8) == (2, 1)  # fewer kv heads than ranks: replicated
    assert rank_heads(28, 4, 8) is None  # 28 heads do not split 8 ways
    assert rank_heads(12, 2, 4) == (3, 1)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model.*Qwen9"):
        all_launches(["Qwen9"])


def test_planned_ub_is_the_largest_offset_plus_size_in_ub():
    ir = textwrap.dedent("""
        %c0_i64 = arith.constant 0 : i64
        %c4096_i64 = arith.constant 4096 : i64
        %c65536_i64 = arith.constant 65536 : i64
        %0 = hivm.hir.pointer_cast(%c0_i64) : memref<64x16xf32, #hivm.address_space<ub>>
        %1 = hivm.hir.pointer_cast(%c4096_i64, %c65536_i64) : memref<64x128xbf16, #hivm.address_space<ub>>
        %2 = hivm.hir.pointer_cast(%c0_i64) : memref<512x512xf32, #hivm.address_space<cbuf>>
    """)
    assert planned_ub_bytes(ir) == 65536 + 64 * 128 * 2  # the cube's L1 (cbuf) is not UB
    assert not uses_cube(ir)
    assert uses_cube(ir + "hivm.hir.mmad ins(...)")


def test_occupancy_rules():
    assert programs_per_sm(registers=255, warps=4, shared=0, shared_per_sm=233472) == 2  # 65536 / (256 * 32 * 4)
    assert programs_per_sm(registers=32, warps=4, shared=0, shared_per_sm=233472) == 16  # 64 warps an SM
    assert programs_per_sm(registers=64, warps=4, shared=81920, shared_per_sm=167936) == 2  # 164 KB an SM (sm_80)


def test_verdicts_and_tables():
    fits = Variant("_k", "BLOCK=64", "float16", KernelResources(registers=90, spill_stores=0, shared=1024,
                                                                 limit_shared=232448, warps=4, stages=2,
                                                                 programs_per_core=8), launches=3, example="x")
    spills = Variant("_k", "BLOCK=128", "float16", KernelResources(registers=255, spill_stores=36, shared=0,
                                                                    limit_shared=232448), launches=1)
    over = Variant("_a", "", "bfloat16", KernelResources(ub_bytes=232000, limit_ub=196608, cube=True))
    broke = Variant("paged_attention", "", "bfloat16", error="MLIRCompilationError: ub overflow")
    report = TargetReport("sm_90", "cuda", [fits, spills], launches=4, seconds=1.0)
    assert report.failures() == [spills] and "36 bytes spill stores" in report.markdown()
    again = TargetReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again.markdown() == report.markdown()
    ascend = TargetReport("Ascend910B3", "npu", [over, broke], launches=2, seconds=1.0)
    assert [v.problems() for v in ascend.failures()] == [["UB 226.6 KB > 192 KB"], [broke.error]]


def _compile_in_subprocess(script: str, python: Path | str = sys.executable) -> dict:
    """Run `script` (which prints one JSON line last) without TRITON_INTERPRET: real compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([str(python), "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


_PREFILL_BS128 = """
    import dataclasses, json
    from qwen_vl_triton.benchmarks.compile_check.check import run_target
    from qwen_vl_triton.benchmarks.compile_check.launches import all_launches
    from qwen_vl_triton.kernels.target import KNOWN_TARGETS
    launches = [l for l in all_launches(["Qwen2.5-VL-7B"], ["paged_prefill_attention"])
                if l.model.endswith("tp1") and str(l.dtype) == "torch.bfloat16" and l.shape == "{shape}"]
    assert len(launches) == 1, launches
    target = dataclasses.replace(KNOWN_TARGETS["{arch}"], **{overrides})
    report = run_target(target, launches=launches)
    print(json.dumps(report.to_json()))
"""


def test_sm90_compile_of_the_launchers_plan_fits():
    """paged prefill with 128-slot blocks and 64-row query tiles, 28/4 heads (it spilled 184-200
    bytes before the key tiles): compiled by Triton and ptxas for sm_90, no spill."""
    got = TargetReport.from_json(_compile_in_subprocess(_PREFILL_BS128.format(
        arch="sm_90", shape="fresh T=16 28/4 heads BS=128", overrides="{}")))
    (variant,) = got.variants
    assert variant.kernel == "_paged_prefill_kernel" and "BLOCK_N=32" in variant.constexprs
    assert variant.resources.registers > 0 and variant.resources.warps == 8
    assert got.failures() == []


def test_sm90_compile_check_catches_spills():
    """The same launch with the old plan (the whole 128-slot block as one key tile, 4 warps)."""
    got = TargetReport.from_json(_compile_in_subprocess(_PREFILL_BS128.format(
        arch="sm_90", shape="fresh T=16 28/4 heads BS=128", overrides="{'key_tile': 128, 'attention_warps': 2}")))
    (variant,) = got.failures()
    assert variant.resources.spill_stores > 0 and "spill stores" in variant.problems()[0]


@pytest.mark.skipif(not ASCEND_PYTHON.exists(), reason="needs .venv-ascend (made by `make compile-check`)")
def test_ascend_compile_check_catches_ub_overflow_and_passes_the_plan():
    """bishengir for Ascend910B3 rejects the old plan (a 128-key tile: 'ub overflow') and
    accepts the launchers' plan within the 192 KB unified buffer."""
    bad = TargetReport.from_json(_compile_in_subprocess(_PREFILL_BS128.format(
        arch="Ascend910B3", shape="fresh T=16 28/4 heads BS=128", overrides="{'key_tile': 128}"), ASCEND_PYTHON))
    assert [v.error for v in bad.failures()] and "overflow" in bad.failures()[0].error
    good = TargetReport.from_json(_compile_in_subprocess(_PREFILL_BS128.format(
        arch="Ascend910B3", shape="fresh T=16 28/4 heads BS=128", overrides="{}"), ASCEND_PYTHON))
    (variant,) = good.variants
    assert good.failures() == [] and 0 < variant.resources.ub_bytes <= 192 * 1024 and variant.resources.cube


def test_every_committed_plan_is_a_launch_of_its_op_at_its_bucket_end():
    """plan_launches: each entry of a device's plan file, fp16 and bf16 (the paged ops at every
    cache block size), launched where its bucket ends; a head dim no checkpoint has is named."""
    from qwen_vl_triton.benchmarks.compile_check.launches import PLAN_OPS, plan_launches
    from qwen_vl_triton.kernels.plans import AttentionPlan, PlanEntry, PlanTable, RowPlan

    table = PlanTable((PlanEntry("varlen", 80, 1024, AttentionPlan(64, 64)),
                       PlanEntry("paged_decode", 128, 32, AttentionPlan(16, 64, 8, 3)),
                       PlanEntry("silu_and_mul", 18944, 16, RowPlan(8192, 2, 8))), "plans/sm_90.json")
    launches = plan_launches(table)
    assert len(launches) == 2 + 2 * len(BLOCK_SIZES) + 2
    assert {(launch.op, launch.shape) for launch in launches if launch.op == "varlen_attention"} == {
        ("varlen_attention", "T=1024 16/16 heads")}
    assert {launch.op for launch in launches} == {PLAN_OPS["varlen"], PLAN_OPS["paged_decode"], "silu_and_mul"}
    assert [launch.shape for launch in launches if launch.op == "silu_and_mul"] == ["[16, 18944]"] * 2
    assert [(launch.op, launch.dtype) for launch in plan_launches(table, ["silu_and_mul"])] == [
        ("silu_and_mul", torch.float16), ("silu_and_mul", torch.bfloat16)]
    with pytest.raises(ValueError, match="plans/sm_90.json: a varlen plan for head dim 96"):
        plan_launches(PlanTable((PlanEntry("varlen", 96, 64, AttentionPlan(64, 64)),), "plans/sm_90.json"))
