"""benchmarks/tune.py: the candidate space and its filters (attention and row ops), the choice of
plans with a fake bench (fastest per bucket, failing / spilling / wrong ones skipped, the file read
back by the launchers' Target), tiny real measurements in the interpreter, and, in subprocesses
without the interpreter, compile-only sm_90 runs that drop a spilling plan."""

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
from qwen_vl_triton.kernels.plans import AttentionPlan, PlanEntry, PlanTable, RowPlan, parse_plans
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
    n = len(tune.candidates(shapes, tune.candidate_plans(True) + tune.row_candidate_plans(True)))
    assert lines[-1] == f"{n} candidates in {len(shapes)} bucket(s)"
    assert "28/4 heads" in lines[0]  # Qwen2.5-VL-7B's heads at tp1


def test_dry_run_lists_the_row_ops_at_the_released_widths(capsys):
    lines = _dry_run(capsys, "--ops", ",".join(plans.ROW_OPS))
    # Qwen2.5-VL-7B: LLM hidden 3584, intermediate 18944; its ViT: RMSNorm 1280, gated MLP 3420;
    # Qwen2-VL's ViT: LayerNorm 1280.
    widths = {"rms_norm": (3584, 1280), "add_rms_norm": (3584,), "layer_norm": (1280,),
              "silu_and_mul": (18944, 3420)}
    assert tune.released_widths() == {op: list(w) for op, w in widths.items()}
    heads = {line.split(":")[0] for line in lines[:-1]}
    assert heads == {f"{op} width={w}, rows <= {b}" for op, ws in widths.items() for w in ws
                     for b in tune.ROW_BUCKETS}
    assert "rms_norm width=3584, rows <= 4096: t8192 p2 w16" in lines  # t2048 / t4096 launch as t1024
    # One row is one program of one row whatever the tile or programs per core: only warps differ.
    assert [line.split(": ")[1] for line in lines if line.startswith("layer_norm width=1280, rows <= 1:")] == [
        "t1024 p1 w2", "t1024 p1 w4", "t1024 p1 w8", "t1024 p1 w16"]
    shapes = tune.tune_shapes(plans.ROW_OPS)
    assert lines[-1] == f"{len(tune.candidates(shapes, tune.row_candidate_plans(True)))} candidates in 30 bucket(s)"
    ascend = _dry_run(capsys, "--ops", "silu_and_mul", "--widths", "3420", "--buckets", "16384", "--arch",
                      "Ascend910B3")
    # No warps on Ascend; at a 4096-column tile, t1024 .. t4096 all hold one row: 3 distinct tiles.
    assert len(ascend) == 1 + 3 * 4 and all(line.split(": ")[1].count(" ") == 1 for line in ascend[:-1])
    with pytest.raises(ValueError, match="width"):
        tune.main(["--dry-run", "--widths", "4096"])


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
    rows = tune.row_candidate_plans(True)
    assert len(rows) == 5 * 4 * 4 and all(p == RowPlan(*dataclasses.astuple(p)) for p in rows)
    assert all(p.num_warps is None for p in tune.row_candidate_plans(False))
    for c in tune.candidates(tune.tune_shapes(), cuda):
        assert isinstance(c.entry, PlanEntry) and c.entry.max_tokens == c.shape.bucket
    decode = tune.tune_shapes(["paged_decode"], [128], [8])[0]
    assert len(tune.distinct_plans(decode, cuda)) == 6  # one query a tile, a key tile of one block
    assert len(tune.distinct_plans(dataclasses.replace(decode, block_size=128), cuda)) == 18


class FakeBench:
    """Times from a table; plans named in `drop` fail as the device bench would."""

    def __init__(self, times: dict[tuple[int, AttentionPlan | RowPlan], float],
                 drop: dict[AttentionPlan | RowPlan, str]):
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


R_FAST, R_MID, R_SLOW = RowPlan(1024, 4, 4), RowPlan(8192, 2, 8), RowPlan(16384, 1, 16)
R_SPILLS, R_WRONG = RowPlan(16384, 8, 2), RowPlan(8192, 8, 4)
ROW_PLANS = [R_FAST, R_MID, R_SLOW, R_SPILLS, R_WRONG]


def test_row_op_choice_reaches_target_row_plan(tmp_path):
    """A row op swept beside an attention op: each shape takes only plans of its kind, the fastest
    kept one wins per bucket, and the file read back gives the launchers' Target.row_plan."""
    shapes = tune.tune_shapes(["varlen", "rms_norm"], [80], [256, 1024, 4096], widths=[3584])
    assert [str(s) for s in shapes[2:]] == ["rms_norm width=3584, rows <= 256", "rms_norm width=3584, rows <= 4096"]
    times = {(b, p): t for b in (1024, 4096) for p, t in ((FAST, 1.0), (MID, 1.5), (SLOW, 3.0))}
    times |= {(256, R_FAST): 0.1, (256, R_MID): 0.2, (256, R_SLOW): 0.3,
              (4096, R_FAST): 0.9, (4096, R_MID): 0.5, (4096, R_SLOW): 0.7}
    bench = FakeBench(times, {SPILLS: "spilled", WRONG: "wrong", R_SPILLS: "_norm_kernel: 204 bytes spilled",
                              R_WRONG: "max |out - reference| = 0.5"})
    results = tune.sweep(shapes, PLANS + ROW_PLANS, bench, deadline=float("inf"), log=lambda _: None)
    assert all(r.complete and len(r.outcomes) == 5 for r in results)
    assert all(isinstance(o.candidate.plan, RowPlan) == r.shape.rows for r in results for o in r.outcomes)
    winners = tune.choose_winners(results, log=lambda _: None)
    assert {(s.op, s.bucket): o.candidate.plan for s, o in winners.items() if s.rows} == {
        ("rms_norm", 256): R_FAST, ("rms_norm", 4096): R_MID}
    previous = PlanTable((PlanEntry("layer_norm", 1280, 16, RowPlan(2048, 1)),))  # not swept: kept
    path = tmp_path / "sm_90.json"
    read = tune.write_plans(tune.merged_table(winners, results, previous), path, "sm_90", "NVIDIA H100", "test")
    data = json.loads(path.read_text())
    assert data["plans"]["rms_norm"][0] == {"width": 3584, "max_tokens": 256, "tile_elements": 1024,
                                            "programs_per_core": 4, "num_warps": 4}
    table = parse_plans(data, "again")
    assert table.entries == read.entries and len(table.entries) == 5
    target = dataclasses.replace(INTERPRETER, plans=table)
    assert target.row_plan("rms_norm", 3584, 7) == R_FAST
    assert target.row_plan("rms_norm", 3584, 257) == R_MID
    assert target.row_plan("rms_norm", 3584, 20000) == R_MID  # past the last bucket: the largest
    assert target.row_plan("layer_norm", 1280, 3) == RowPlan(2048, 1)
    assert target.row_plan("rms_norm", 1280, 3) == RowPlan(4096, 1)  # not swept: the defaults
    assert target.attention_plan("varlen", 80, 200) == FAST
    rows = tune.report_rows(results, winners, copy_gbs=100.0)
    row = rows[3]
    assert row["op"] == "rms_norm" and row["best plan"] == "t8192 p2 w8" and row["heads"] == "-"
    assert row["baseline / best"] == "8.00" and row["kept / tried"] == "3/5"
    # 2 x 4096 x 3584 bf16 bytes in 0.5 ms = 117 GB/s of a 100 GB/s copy.
    assert row["best frac copy bw"] == "1.17" and rows[0]["best frac copy bw"] == "-"


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
    bench._expected = tuple(e + 1 for e in bench._expected)  # as if the kernel computed something else
    with pytest.raises(tune.Dropped, match="reference"):
        bench.measure(tune.Candidate(tune.Shape("paged_decode", 32, 2, 4, 2), AttentionPlan(16, 16)))


def test_device_bench_runs_tiny_row_ops_in_the_interpreter():
    """Row ops on the CPU interpreter (5 rows, fp32): add_rms_norm's two outputs both checked,
    silu_and_mul over [rows, 2 x width]; no torch.compile baseline on the CPU."""
    bench = tune.DeviceBench(torch.device("cpu"), warmup=0, reps=1, dtype=torch.float32)
    for shape in (tune.Shape("add_rms_norm", 40, 5), tune.Shape("silu_and_mul", 24, 5)):
        work = tune.make_workload(shape, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(work.triton_run(), work.reference(), atol=1e-4, rtol=1e-4)
        assert bench.measure(tune.Candidate(shape, RowPlan(1024, 2, 4))) > 0
        assert bench.default_ms(shape) > 0 and bench.baseline_ms(shape) > 0 and bench.compiled_ms(shape) is None
    bench._expected = (bench._expected[0] * 2,)
    with pytest.raises(tune.Dropped, match="reference"):
        bench.measure(tune.Candidate(tune.Shape("silu_and_mul", 24, 5), RowPlan(1024, 1)))


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


def test_compile_only_sm90_drops_a_spilling_row_plan():
    """Real compiles for sm_90 of rms_norm at 3584 wide, 4096 rows: 4 rows of 4096 columns a
    program at 2 warps (t16384) spill; one row a tile (t4096) fits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-m", "qwen_vl_triton.benchmarks.tune", "--dry-run", "--compile-only",
                          "sm_90", "--ops", "rms_norm", "--widths", "3584", "--buckets", "4096",
                          "--row-tiles", "4096,16384", "--row-programs", "4", "--row-warps", "2"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "rms_norm width=3584, rows <= 4096: t4096 p4 w2  fits" in out
    assert "t16384 p4 w2  DROPPED: " in out and "spill stores" in out.split("t16384 p4 w2")[1]
    assert "1/2 survive sm_90" in out
