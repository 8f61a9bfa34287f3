"""Tensor parallelism end to end: the engine over 2 and 4 gloo ranks on the CPU gives the tokens of
one process, for both architectures, with images and a video; a clip that does not decode ends
alone on every rank.

Each case runs tests/parallel/tp_script.py as separate processes on 127.0.0.1. The kernels mostly
run their PyTorch references there (QVL_KERNELS=torch, fast): the Triton kernels are proven against
those references in tests/kernels and on the whole model in tests/modeling, and what is under test
here is the sharding and the collectives; one 2-rank case runs the Triton kernels (interpreted) on
the per-rank head counts. The tiny checkpoints have 4 query heads, 2 kv heads (fewer than
4 ranks: replicated kv heads) and 4 vision heads; their MLPs (250 text features, 130 in
Qwen2.5-VL's vision MLP) and vocabulary (578 rows) are not multiples of 4 (balanced MLP shares, the
last rank's LM-head shard padded).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_vl_triton.testing.tiny_checkpoint import make_tiny_checkpoint
from tests.parallel.launch import run_ranks

SCRIPT = Path(__file__).with_name("tp_script.py")
TP_SIZES = {"vision_num_heads": 4, "intermediate_size": 250, "vision_intermediate_size": 130,
            "extra": {"vocab_size": 578}}
GREEDY = ("image", "text", "late", "video")
# A hang guard, not a speed limit: a rank that fails ends the job at once (launch.wait_for_exit); this
# bound only ends a job that hangs, and is generous for 4 ranks on 2 loaded cores (the Triton case interpreted).
TIMEOUT_S = 900


def tp_checkpoint(path: Path, arch: str) -> Path:
    return make_tiny_checkpoint(path, arch, seed=5, **TP_SIZES)


def run_world(checkpoint: Path, world: int, out: Path, tight: bool = False, kernels: str = "torch") -> list[dict]:
    args = [str(checkpoint), str(out)] + (["tight"] if tight else [])
    run_ranks(SCRIPT, args, world, out, TIMEOUT_S, env={"QVL_KERNELS": kernels, "TRITON_INTERPRET": "1"})
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def assert_same_tokens(reports: list[dict], ref: dict, world: int) -> None:
    """Every rank saw the same outputs; rank 0's greedy and seeded tokens are the 1-process ones."""
    for rank, report in enumerate(reports):
        # Every rank ran the same schedule and drew the same tokens (logits are all-gathered).
        assert report["outputs"] == reports[0]["outputs"], (world, rank)
        assert report["all_blocks_free"], (world, rank)
        assert report["preemptions"] == reports[0]["preemptions"], (world, rank)
    outs = dict(reports[0]["outputs"])
    assert set(outs) == set(ref)
    for request_id in (*GREEDY, "seeded", "samples", "samples#1", "samples#2", "json"):
        assert outs[request_id]["ids"] == ref[request_id]["ids"], (world, request_id)
        diffs = [abs(a - b) for a, b in zip(outs[request_id]["logprobs"], ref[request_id]["logprobs"], strict=True)]
        assert max(diffs) < 1e-4, (world, request_id, diffs)
    corrupt = outs.pop("corrupt")
    assert corrupt["finish_reason"] == "error" and "RequestMediaError" in corrupt["error"] and not corrupt["ids"]
    assert json.loads(outs.pop("json")["text"])["n"] in (1, 22)  # the constraint complete: a "stop"
    assert all(o["finish_reason"] == "length" for o in outs.values())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_tp_2_and_4_ranks_match_one_process(arch: str, tmp_path: Path) -> None:
    checkpoint = tp_checkpoint(tmp_path / "ckpt", arch)
    (single,) = run_world(checkpoint, 1, tmp_path / "w1")
    ref = single["outputs"]
    assert set(ref) == {"image", "text", "seeded", "unseeded", "late", "video", "corrupt", "json",
                        "samples", "samples#1", "samples#2"}  # not "aborted"
    assert single["kv_cache_shape"][2] == 2 and single["embed_rows"] == 578
    for world in (2, 4):
        reports = run_world(checkpoint, world, tmp_path / f"w{world}")
        assert_same_tokens(reports, ref, world)
        for report in reports:
            assert report["kv_cache_shape"][2] == 1  # each rank caches only its kv head
            assert report["embed_rows"] == -(-578 // world)  # 289 or 145 (the last rank padded)


def test_tp_under_preemption_and_chunked_prefill(tmp_path: Path) -> None:
    """8 KV blocks and 23 prefill tokens per step: sequences are preempted and recomputed and
    prompts prefilled in chunks (steps where nothing samples), in lockstep on both ranks."""
    checkpoint = tp_checkpoint(tmp_path / "ckpt", "qwen2_5_vl")
    (single,) = run_world(checkpoint, 1, tmp_path / "w1", tight=True)
    assert single["preemptions"] > 0
    assert_same_tokens(run_world(checkpoint, 2, tmp_path / "w2", tight=True), single["outputs"], 2)


def test_tp_on_the_triton_path(tmp_path: Path) -> None:
    """2 ranks on the Triton kernels (interpreted: 2 query heads, 1 kv head and 2 vision heads per
    rank) give the tokens of one process on the references."""
    checkpoint = tp_checkpoint(tmp_path / "ckpt", "qwen2_5_vl")
    (single,) = run_world(checkpoint, 1, tmp_path / "w1")
    assert_same_tokens(run_world(checkpoint, 2, tmp_path / "w2", kernels="triton"), single["outputs"], 2)


def test_tp_decode_forward_has_no_host_sync(tmp_path: Path) -> None:
    """The no-sync property of tests/engine/test_no_sync.py at world size 2: each rank's decode
    forward, collectives included, reads no tensor value on the host."""
    checkpoint = tp_checkpoint(tmp_path / "ckpt", "qwen2_5_vl")
    out = tmp_path / "w2"
    run_ranks(SCRIPT.with_name("no_sync_script.py"), [str(checkpoint), str(out)], 2, out, TIMEOUT_S,
              env={"QVL_KERNELS": "triton", "TRITON_INTERPRET": "1"})
    for rank in range(2):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report["ops"] > 0 and report["runs"] == [1, 1, 1] and report["logits"][0] == 3, (rank, report)
