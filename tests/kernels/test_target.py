"""kernels.target: the one description of the device every launcher plans from."""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from qwen_vl_triton.kernels.attention_common import head_dim_blocks
from qwen_vl_triton.kernels.attention_paged import cache_key_tile, decode_splits
from qwen_vl_triton.kernels.plans import AttentionPlan
from qwen_vl_triton.kernels.target import (
    A100,
    ASCEND_910B3,
    ASCEND_A3,
    H100,
    INTERPRETER,
    KNOWN_TARGETS,
    Work,
    current_target,
    rows_per_tile,
    use_target,
)
from tests.helpers import DEVICE


def test_cpu_tensors_plan_for_the_interpreter_unless_told_otherwise():
    assert current_target(torch.device("cpu")) is INTERPRETER
    with use_target(H100):
        assert current_target(torch.device("cpu")) is H100
        with use_target(ASCEND_A3):  # nests, and restores on the way out
            assert current_target(torch.device("cpu")) is ASCEND_A3
        assert current_target(torch.device("cpu")) is H100
    assert current_target(torch.device("cpu")) is INTERPRETER


def test_use_target_restores_after_an_error():
    with pytest.raises(RuntimeError), use_target(A100):
        raise RuntimeError("boom")
    assert current_target(torch.device("cpu")) is INTERPRETER


@pytest.mark.parametrize("target", list(KNOWN_TARGETS.values()), ids=list(KNOWN_TARGETS))
def test_grids_follow_cores_and_programs_per_core(target):
    for work in Work:
        full = target.cores(work) * target.programs_per_core[work]
        assert target.grid(10**7, work) == min(full, 65535)
        assert target.grid(3, work) == 3  # never more programs than work
        assert target.grid(0, work) == 1
    if target.backend == "npu":  # one program per core; attention on the cube (AI) cores
        assert target.grid(10**7, Work.ATTENTION) == target.cube_cores
        assert target.grid(10**7, Work.ROWS) == target.vector_cores
    else:  # several resident programs per SM
        assert target.grid(10**7, Work.COPY) > target.grid(10**7, Work.ROWS) > target.vector_cores


def test_dot_operands_keep_the_device_dtype_except_in_the_interpreter():
    assert H100.dot_dtype(torch.bfloat16) == tl.bfloat16
    assert ASCEND_910B3.dot_dtype(torch.float16) == tl.float16
    assert H100.dot_dtype(torch.float32) == tl.float32
    for t in (INTERPRETER, dataclasses.replace(H100, interpret=True)):
        assert t.dot_dtype(torch.bfloat16) == tl.float32  # the interpreter's bf16 dots are wrong


def test_attention_launch_options():
    assert ASCEND_910B3.attention_options(64, 128) == {}  # bishengir plans its own
    assert H100.attention_options(16, 128) == {"num_warps": 4, "num_stages": 2}
    assert A100.attention_options(32, 128)["num_warps"] == 4
    # a 64 x 128 query tile at 4 warps needs 255 registers a thread and spills: twice the warps
    assert H100.attention_options(64, 128)["num_warps"] == 8
    # a plan's warps and stages win; a plan without them keeps the rule
    assert H100.attention_options(64, 128, AttentionPlan(128, 64, 8, 3)) == {"num_warps": 8, "num_stages": 3}
    assert H100.attention_options(64, 128, AttentionPlan(64, 64)) == {"num_warps": 8, "num_stages": 2}
    assert ASCEND_A3.attention_options(64, 128, AttentionPlan(128, 64, 8, 3)) == {}


@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_large_cache_blocks_are_walked_in_key_tiles(block_size):
    for target in KNOWN_TARGETS.values():
        for op in ("paged_prefill", "paged_decode"):
            plan = target.attention_plan(op, 128, 16)
            tile = cache_key_tile(block_size, plan)
            assert block_size % tile == 0 and tile == min(block_size, plan.key_tile)
    if not H100.plans.entries and not A100.plans.entries:  # the defaults, until a tuned file is committed
        assert cache_key_tile(128, H100.attention_plan("paged_prefill", 128, 16)) == 32
        assert cache_key_tile(128, A100.attention_plan("paged_decode", 128, 16)) == 32
    if not ASCEND_910B3.plans.entries and not ASCEND_A3.plans.entries:
        assert cache_key_tile(128, ASCEND_910B3.attention_plan("paged_prefill", 128, 16)) == 64
        assert cache_key_tile(128, ASCEND_A3.attention_plan("paged_decode", 128, 16)) == 64


def test_decode_splits_policy():
    """Splits fill the cores only when B * Hk does not, and never go below MIN_SPLIT_TOKENS."""
    target = current_target(DEVICE)
    programs = target.cores(Work.ATTENTION) * target.programs_per_core[Work.ATTENTION]
    assert decode_splits(programs, 1, 256, 128, target) == 1  # every program has a sequence already
    assert decode_splits(1, 1, 256, 128, target) > 1
    assert decode_splits(1, 1, 1, 16, target) == 1  # nothing to split
    assert decode_splits(1, 1, 4, 16, target) == 1  # 64 tokens < MIN_SPLIT_TOKENS
    assert decode_splits(1, 1, 10_000, 16, target) > 1
    # A chip with more cores splits a lone long sequence further.
    assert decode_splits(1, 1, 10_000, 16, H100) > decode_splits(1, 1, 10_000, 16, ASCEND_910B3)


def test_rows_per_tile_stack_narrow_rows_only_while_programs_stay_busy():
    assert rows_per_tile(1, 2048, H100) == 1
    assert rows_per_tile(10**6, 2048, H100) == 2  # 4096 elements a tile
    assert rows_per_tile(10**6, 128, ASCEND_910B3) == 32
    assert rows_per_tile(40, 128, ASCEND_910B3) == 1  # 40 rows, 40 vector cores


def test_head_dim_column_tiles():
    """Every head dim up to 256: a power-of-two first tile, a tail of 0 or a power of two >= 16,
    together covering d, and two tiles only where they pad less than one."""
    for d in range(1, 257):
        first, tail = head_dim_blocks(d)
        whole = max(16, triton.next_power_of_2(d))
        assert first & (first - 1) == 0 and first >= 16 and first + tail >= d
        if tail:
            assert tail & (tail - 1) == 0 and tail >= 16 and first < d and first + tail < whole
        else:
            assert first == whole
    assert head_dim_blocks(80) == (64, 16) and head_dim_blocks(128) == (128, 0)
    with pytest.raises(ValueError, match="head dim 257 > 256"):
        head_dim_blocks(257)
