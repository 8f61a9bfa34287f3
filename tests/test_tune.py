"""benchmarks/tune.py: the candidate space and its filters, the choice of plans with a fake bench
(fastest per bucket, failing / spilling / wrong ones skipped, the file read back by the
launchers' Target), one tiny real measurement in the interpreter, and, in a subprocess without
the interpreter, a compile-only sm_90 run that drops a spilling plan."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_vl_triton.benchmarks import tune
from qwen_vl_triton.kernels import plans
from qwen_vl_triton.kernels.plans import AttentionPlan, PlanEntry, PlanTable, parse_plans
from qwen_vl_triton.kernels.target import INTERPRETER

REPO = Path(__file__).resolve().parents[1]


def _dry_run(capsys, *argv: str) -> list[str]:
    assert tune.main(["--dry-run", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_lists_every_op_head_dim_and_bucket(capsys):
    lines = _dry_run(capsys)
    for op in plans.OPS:
        dims = (128, 80) if op == "varlen" else (128,)  # the ViT has no paged cache
        for d in dims:
            for bucket in tune.BUCKETS[op]:
                assert any(line.startswith(f"{op} d={d} ") and line.split(":")[0].endswith(f"<= {bucket}")
                           for line in lines), (op, d, bucket)
    assert not any(line.startswith("paged_decode d=80") for line in lines)
    shapes = tune.tune_shapes()
    n = len(tune.candidates(shapes, tune.candidate_plans(True)))
    assert lines[-1] == f"{n} candidates in {len(shapes)} bucket(s)"
    assert "28/4 heads" in lines[0]  # Qwen2.5-VL-7B's heads at tp1


def test_dry_run_filters(capsys):
    lines = _dry_run(capsys, "--ops", "paged_prefill", "--head-dims", "128", "--buckets", "512,2048",
                     "--warps", "8", "--stages", "3")
    listed = lines[:-1]
    assert listed and all(line.startswith("paged_prefill d=128") for line in listed)
    assert {line.split(":")[0].rsplit(" ", 1)[1] for line in listed} == {"512", "2048"}
    assert all(line.endswith("w8 s3") for line in listed)
    # At the engine's 16-slot blocks a paged key tile is one block: only query_rows differ.
    assert len(listed) == 2 * len(tune.QUERY_ROWS)
    with pytest.raises(ValueError, match="head dim"):
        tune.main(["--dry-run", "--head-dims", "96"])
    with pytest.raises(SystemExit):
        tune.main(["--dry-run", "--ops", "bogus"])


def test_candidate_space_fits_the_plan_constraints():
    cuda = tune.candidate_plans(True)
    assert len(cuda) == 3 * 3 * 2 * 3 and len(set(cuda)) == len(cuda)
    for p in cuda:
        assert p.query_rows in plans.TILE_SIZES and p.key_tile in plans.TILE_SIZES
        assert p.num_warps in plans.WARPS and p.num_stages in plans.STAGES
        assert AttentionPlan(p.query_rows, p.key_tile, p.num_warps, p.num_stages) == p
    ascend = tune.candidate_plans(False)  # tiles only: bishengir picks its own
    assert len(ascend) == 9 and all(p.num_warps is None and p.num_stages is None for p in ascend)
    for c in tune.candidates(tune.tune_shapes(), cuda):
        assert isinstance(c.entry, PlanEntry) and c.entry.max_tokens == c.shape.bucket
    decode = tune.tune_shapes(["paged_decode"], [128], [8])[0]
    assert len(tune.distinct_plans(decode, cuda)) == 6  # one query a tile, a key tile of one block
    assert len(tune.distinct_plans(dataclasses.replace(decode, block_size=128), cuda)) == 18


class FakeBench:
    """Times from a table; plans named in `drop` fail as the device bench would."""

    def __init__(self, times: dict[tuple[int, AttentionPlan], float], drop: dict[AttentionPlan, str]):
        self.times, self.drop, self.measured = times, drop, []

    def measure(self, candidate: tune.Candidate) -> float:
        self.measured.append(candidate)
        if candidate.plan in self.drop:
            raise tune.Dropped(self.drop[candidate.plan])
        return self.times[(candidate.shape.bucket, candidate.plan)]

    def default_ms(self, shape: tune.Shape) -> float:
        return 2.0

    def baseline_ms(self, shape: tune.Shape) -> float:
        return 4.0


FAST, MID, SLOW = AttentionPlan(32, 32, 4, 2), AttentionPlan(64, 64, 8, 2), AttentionPlan(128, 128, 8, 3)
SPILLS, WRONG = AttentionPlan(128, 128, 4, 2), AttentionPlan(128, 64, 4, 2)
PLANS = [FAST, MID, SLOW, SPILLS, WRONG]


def _fake_sweep(**kw):
    # Buckets past 128 tokens: no two of PLANS launch alike (a varlen key tile is capped by L).
    shapes = tune.tune_shapes(["varlen"], [80], [1024, 4096])
    # SPILLS and WRONG would be the fastest: only their drops keep them out.
    times = {(1024, FAST): 1.0, (1024, MID): 1.5, (1024, SLOW): 3.0, (4096, FAST): 9.0, (4096, MID): 5.0,
             (4096, SLOW): 7.0}
    bench = FakeBench(times, {SPILLS: "_varlen_attention_kernel: 40 bytes spilled",
                              WRONG: "max |out - reference| = 0.5"})
    return shapes, bench, tune.sweep(shapes, PLANS, bench, deadline=float("inf"), log=lambda _: None, **kw)


def test_choice_skips_dropped_plans_and_the_file_reaches_the_launchers(tmp_path):
    shapes, _, results = _fake_sweep()
    assert all(r.complete and len(r.outcomes) == len(PLANS) for r in results)
    winners = tune.choose_winners(results, log=lambda _: None)
    assert {s.bucket: o.candidate.plan for s, o in winners.items()} == {1024: FAST, 4096: MID}
    assert [o.dropped for o in results[0].outcomes if o.dropped] == ["_varlen_attention_kernel: 40 bytes spilled",
                                                                     "max |out - reference| = 0.5"]
    previous = PlanTable((PlanEntry("paged_decode", 128, 8, AttentionPlan(16, 16, 4, 2)),
                          PlanEntry("varlen", 80, 64, SLOW)))  # the second is re-tuned, the first kept
    table = tune.merged_table(winners, results, previous)
    path = tmp_path / "sm_90.json"
    read = tune.write_plans(table, path, "sm_90", "NVIDIA H100", "benchmarks/tune.py test")
    again = parse_plans(json.loads(path.read_text()), "again")
    assert read.entries == again.entries == table.entries and len(table.entries) == 3
    target = dataclasses.replace(INTERPRETER, plans=read)
    assert target.attention_plan("varlen", 80, 50) == FAST
    assert target.attention_plan("varlen", 80, 1000) == FAST
    assert target.attention_plan("varlen", 80, 1025) == MID
    assert target.attention_plan("varlen", 80, 9000) == MID  # past the last bucket: the largest
    assert target.attention_plan("paged_decode", 128, 3) == AttentionPlan(16, 16, 4, 2)
    assert target.attention_plan("varlen", 128, 64) == AttentionPlan(64, 64)  # not swept: the defaults

    rows = tune.report_rows(results, winners)
    assert rows[1]["best plan"] == "q64 k64 w8 s2" and rows[1]["default / best"] == "0.40"
    assert rows[1]["baseline / best"] == "0.80" and rows[0]["kept / tried"] == "3/5"


def test_a_winner_failing_the_compile_check_gives_way_to_the_next():
    _, _, results = _fake_sweep()
    asked = []

    def verify(cands):
        asked.append([c.plan for c in cands])
        return {c: "40 bytes spill stores" if c.plan == FAST else None for c in cands}

    winners = tune.choose_winners(results, verify, log=lambda _: None)
    assert {s.bucket: o.candidate.plan for s, o in winners.items()} == {1024: MID, 4096: MID}
    assert asked == [[FAST, MID], [MID]]


def test_the_budget_stops_the_sweep_and_keeps_what_it_measured(monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(tune.time, "time", lambda: next(clock))
    shapes = tune.tune_shapes(["varlen"], [80], [64, 1024])
    bench = FakeBench({(64, p): float(i + 1) for i, p in enumerate(PLANS)}, {})
    results = tune.sweep(shapes, PLANS, bench, deadline=3, log=lambda _: None)
    (first,) = results  # the second bucket never started
    assert not first.complete and len(first.outcomes) == 2
    assert tune.choose_winners(results)[first.shape].candidate.plan == FAST


def test_no_device_exits_2_with_what_it_needs(monkeypatch, capsys):
    monkeypatch.setattr(tune, "_device", lambda: None)
    assert tune.main(["--ops", "varlen"]) == 2
    err = capsys.readouterr().err
    assert "NVIDIA GPU" in err and "Ascend" in err and "--dry-run" in err


def test_device_bench_runs_a_tiny_shape_in_the_interpreter(monkeypatch):
    """The real bench on the CPU interpreter (small fp32 shapes): the launch, the reference and
    the baseline agree, a candidate is timed, and a wrong output is dropped."""
    monkeypatch.setattr(tune, "CONTEXT", 24)
    monkeypatch.setattr(tune, "VARLEN_TOKENS", 32)
    bench = tune.DeviceBench(torch.device("cpu"), warmup=0, reps=1, dtype=torch.float32)
    for shape in (tune.Shape("varlen", 32, 16, 4, 2), tune.Shape("paged_prefill", 32, 8, 4, 2),
                  tune.Shape("paged_decode", 32, 2, 4, 2)):
        work = tune.make_workload(shape, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(work.triton_run(), work.reference(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(work.baseline(), work.reference(), atol=1e-4, rtol=1e-4)
        assert bench.measure(tune.Candidate(shape, AttentionPlan(16, 16))) > 0
        assert bench.default_ms(shape) > 0 and bench.baseline_ms(shape) > 0
    bench._expected = bench._expected + 1  # as if the kernel computed something else
    with pytest.raises(tune.Dropped, match="reference"):
        bench.measure(tune.Candidate(tune.Shape("paged_decode", 32, 2, 4, 2), AttentionPlan(16, 16)))


def test_compile_only_sm90_drops_the_spilling_plan():
    """Real compiles for sm_90 (Triton and ptxas, no GPU): causal varlen at head dim 128, 28/4
    heads, 1024 tokens: 32-row x 32-key tiles at 4 warps fit; 128 x 128 at 4 warps spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-m", "qwen_vl_triton.benchmarks.tune", "--dry-run", "--compile-only",
                          "sm_90", "--ops", "varlen", "--head-dims", "128", "--buckets", "1024",
                          "--query-rows", "32,128", "--key-tiles", "32,128", "--warps", "4", "--stages", "2"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "varlen d=128 28/4 heads, tokens <= 1024: q32 k32 w4 s2  fits" in out
    assert "q128 k128 w4 s2  DROPPED: " in out and "spill stores" in out.split("q128 k128 w4 s2")[1]
    assert "survive sm_90" in out and "1/4 survive" in out
