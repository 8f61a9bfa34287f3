"""`make tune`: sweep the attention tile plans and the row-op launch plans on this device and
commit the fastest per bucket.

For each attention op (kernels/plans.py OPS: varlen, paged_prefill, paged_decode), each head dim
the released checkpoints use (128: the LLM, with its query/kv heads; 80: the ViT, 16/16 heads;
both from benchmarks/model_shapes.json) and each bucket of query tokens, every candidate plan
(query_rows x key_tile, and on CUDA num_warps x num_stages) is launched at that shape under its own
PlanTable, and dropped if it fails to compile or launch, if a kernel it compiled spills registers,
or if its output differs from the op's PyTorch reference beyond a bf16 tolerance. The survivors
are timed (medians, benchmarks/common.py) beside the Target's default plan and the bench's PyTorch
baseline (SDPA per sequence / gather + SDPA); the fastest per bucket goes into
qwen_vl_triton/kernels/plans/<arch>.json (one file per device, as vLLM keeps its fused-MoE
configs; entries of ops / head dims not swept this run are kept). On sm_80 / sm_90 the winners
are then compiled as `make compile-check` compiles a committed plan (fp16 and bf16, every cache
block size; in a subprocess); a winner that fails gives way to the next fastest. The launchers
read the file at start-up: nothing is tuned at serving time.

The row ops (kernels/plans.py ROW_OPS: rms_norm, add_rms_norm, layer_norm, silu_and_mul) are swept
the same way at the row widths the released checkpoints use (the LLM hidden size for rms_norm /
add_rms_norm, the ViT's for layer_norm (Qwen2-VL) and rms_norm (Qwen2.5-VL); silu_and_mul's N:
the LLM's intermediate size and the gated ViT MLP's) and each bucket of rows (ROW_BUCKETS), over
tile_elements x programs_per_core (x num_warps on CUDA); their output is checked against the op's
reference, their baselines are the reference in eager PyTorch and (on a device) torch.compile of
it, and the table also gives the best plan's fraction of the measured copy bandwidth.

Shapes (bf16, cache block 16 = engine/config.py's default):
  varlen         bucket = longest sequence L: 4096 // L sequences of L tokens (at least one):
                 ViT windows at 64, whole images / frames above; causal at head dim 128 (the LLM);
  paged_prefill  bucket = the step's new tokens T: one sequence of T tokens after a cached
                 prefix of 4096 (a prefix-cache hit / a later prompt chunk);
  paged_decode   bucket = batch B: B sequences of 4096 cached tokens;
  row ops        bucket = rows R: [R, width] (silu_and_mul: [R, 2 x width]).

A table per bucket (best plan, its time, the default plan's, the baseline's, ratios) is printed
and written to benchmarks/results/tune-<device>.md.

Without a GPU or NPU:
    --dry-run                       lists every (op, head dim / width, bucket, candidate) it would try;
    --dry-run --compile-only sm_90  also compiles each candidate for sm_80 / sm_90 (stock Triton
                                    and ptxas, no GPU: the compile check's driver, in a
                                    subprocess) and drops those that spill or overflow, printing
                                    how many survive per bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qwen_vl_triton.benchmarks import CHECKOUT, RESULTS_DIR
from qwen_vl_triton.kernels.plans import (
    OPS,
    PLAN_DIR,
    ROW_OPS,
    ROW_TILES,
    AttentionPlan,
    PlanEntry,
    PlanTable,
    RowPlan,
    parse_plans,
)

if TYPE_CHECKING:
    import torch

# Query tokens of each op's buckets (kernels/plans.py: varlen the longest sequence, paged_prefill
# the step's tokens T, paged_decode the batch B).
BUCKETS: dict[str, tuple[int, ...]] = {
    "varlen": (64, 1024, 4096, 16384),
    "paged_prefill": (16, 512, 2048, 8192),
    "paged_decode": (1, 8, 32, 64, 256),
}
# Rows of the row ops' buckets: decode batches up to the largest benchmarked prefill / ViT step.
ROW_BUCKETS = (1, 16, 256, 4096, 16384)
BUCKETS.update(dict.fromkeys(ROW_OPS, ROW_BUCKETS))
ALL_OPS = (*OPS, *ROW_OPS)
QUERY_ROWS = (32, 64, 128)
KEY_TILES = (32, 64, 128)
SWEEP_WARPS = (4, 8)
SWEEP_STAGES = (2, 3, 4)
BLOCK_SIZE = 16  # the engine's default cache block (engine/config.py)
CONTEXT = 4096  # cached tokens of a decode sequence, and the prefix before a prefill step
VARLEN_TOKENS = 4096  # tokens of a varlen step: short sequences are packed up to this
ROW_PROGRAMS = (1, 2, 4, 8)  # programs_per_core of the row plans swept
ROW_WARPS = (2, 4, 8, 16)  # num_warps of the row plans swept on CUDA
HEADS_MODEL = "Qwen2.5-VL-7B"  # whose heads (at tp1) / widths the shapes take
EPS = 1e-6  # the released checkpoints' norm eps
# bf16 output against the reference (both round to bf16; the kernel's math is fp32).
ATOL = RTOL = 2e-2


@dataclasses.dataclass(frozen=True)
class Shape:
    """One bucket to tune: attention `op` at head dim `size` with `hq` / `hk` query / kv heads, or
    row `op` at row width `size` (hq = hk = 0), measured at the bucket's end (`bucket` query
    tokens or rows, see BUCKETS)."""

    op: str
    size: int
    bucket: int
    hq: int = 0
    hk: int = 0
    block_size: int = BLOCK_SIZE  # of the paged cache

    @property
    def head_dim(self) -> int:
        return self.size

    @property
    def rows(self) -> bool:
        """A row op's shape (RowPlan), not an attention op's."""
        return self.op in ROW_OPS

    def __str__(self) -> str:
        if self.rows:
            return f"{self.op} width={self.size}, rows <= {self.bucket}"
        unit = "batch" if self.op == "paged_decode" else "tokens"
        return f"{self.op} d={self.size} {self.hq}/{self.hk} heads, {unit} <= {self.bucket}"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One plan tried at one shape."""

    shape: Shape
    plan: AttentionPlan | RowPlan

    @property
    def entry(self) -> PlanEntry:
        return PlanEntry(self.shape.op, self.shape.size, self.shape.bucket, self.plan)


def plan_text(plan: AttentionPlan | RowPlan | None) -> str:
    """'q64 k32 w4 s2', 't4096 p4 w8' (warps / stages left out when the plan leaves them to the
    Target)."""
    if plan is None:
        return "-"
    if isinstance(plan, RowPlan):
        return f"t{plan.tile_elements} p{plan.programs_per_core}" + (f" w{plan.num_warps}" if plan.num_warps else "")
    text = f"q{plan.query_rows} k{plan.key_tile}"
    text += f" w{plan.num_warps}" if plan.num_warps else ""
    return text + (f" s{plan.num_stages}" if plan.num_stages else "")


def released_heads(model: str = HEADS_MODEL) -> dict[str, dict[int, tuple[int, int]]]:
    """Per op, head dim -> (query heads, kv heads) at tp1: varlen runs in the LLM (causal prefill)
    and the ViT, the paged ops in the LLM only. `model`'s heads first, then those of the first
    released checkpoint with a head dim `model` lacks."""
    from qwen_vl_triton.benchmarks.compile_check.launches import released_heads as heads_by_dim

    text_heads, vision_heads = heads_by_dim(model)
    return {"varlen": {**vision_heads, **text_heads}, "paged_prefill": text_heads, "paged_decode": text_heads}


def released_widths(model: str = HEADS_MODEL) -> dict[str, list[int]]:
    """Per row op, the row widths (widest first) the released checkpoints run it at: rms_norm /
    add_rms_norm at `model`'s LLM hidden size; the ViT's hidden size for layer_norm (Qwen2-VL's
    ViT) and rms_norm (Qwen2.5-VL's); silu_and_mul's N = the LLM's intermediate size (tp1) and the
    gated ViT MLP's. A ViT of the kind `model` lacks is the first released checkpoint's."""
    from qwen_vl_triton.benchmarks.compile_check.launches import released_models

    models = released_models()
    if model not in models:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(models)}")
    text = models[model][0]
    vits = {}
    for _, vision in [models[model], *models.values()]:
        vits.setdefault(vision.norm, vision)
    rms_vit, ln_vit = vits.get("rmsnorm"), vits.get("layernorm")
    widths = {"rms_norm": [text.hidden, *([rms_vit.hidden] if rms_vit else [])],
              "add_rms_norm": [text.hidden],
              "layer_norm": [ln_vit.hidden] if ln_vit else [],
              "silu_and_mul": [text.intermediate, *([rms_vit.intermediate] if rms_vit and rms_vit.intermediate
                                                    else [])]}
    return {op: sorted(set(w), reverse=True) for op, w in widths.items()}


def tune_shapes(ops: Iterable[str] = ALL_OPS, head_dims: Iterable[int] | None = None,
                buckets: Iterable[int] | None = None, model: str = HEADS_MODEL,
                block_size: int = BLOCK_SIZE, widths: Iterable[int] | None = None) -> list[Shape]:
    """The buckets to tune: every attention op x its released head dims and every row op x its
    released widths, x BUCKETS value, filtered (head_dims: attention ops; widths: row ops)."""
    heads, row_widths = released_heads(model), released_widths(model)
    for what, asked, sizes in (("head dim", head_dims, heads), ("width", widths, row_widths)):
        known = sorted({d for dims in sizes.values() for d in dims})
        unknown = [d for d in asked or () if d not in known]
        if unknown:
            raise ValueError(f"{what}(s) {unknown} not used by a released checkpoint (they use {known})")
    wanted_dims = None if head_dims is None else set(head_dims)
    wanted_widths = None if widths is None else set(widths)
    wanted = None if buckets is None else set(buckets)
    out = []
    for op in ops:
        row = op in ROW_OPS
        sizes, wanted_sizes = (row_widths[op], wanted_widths) if row else (sorted(heads[op], reverse=True), wanted_dims)
        for d in sizes:
            if wanted_sizes is not None and d not in wanted_sizes:
                continue
            hq_hk = (0, 0) if row else heads[op][d]
            out += [Shape(op, d, b, *hq_hk, block_size) for b in BUCKETS[op] if wanted is None or b in wanted]
    return out


def candidate_plans(cuda: bool, query_rows: Sequence[int] = QUERY_ROWS, key_tiles: Sequence[int] = KEY_TILES,
                    warps: Sequence[int] = SWEEP_WARPS, stages: Sequence[int] = SWEEP_STAGES) -> list[AttentionPlan]:
    """The tile space: query_rows x key_tile, times num_warps x num_stages on CUDA (Ascend's
    compiler picks its own, so there the plan leaves them None)."""
    launch = list(itertools.product(sorted(warps), sorted(stages))) if cuda else [(None, None)]
    # Ascending, so that of plans that launch alike (distinct_plans) the smallest tiles are kept.
    return [AttentionPlan(q, k, w, s) for q, k in itertools.product(sorted(query_rows), sorted(key_tiles))
            for w, s in launch]


def row_candidate_plans(cuda: bool, tiles: Sequence[int] = ROW_TILES, programs: Sequence[int] = ROW_PROGRAMS,
                        warps: Sequence[int] = ROW_WARPS) -> list[RowPlan]:
    """The row-op space: tile_elements x programs_per_core, times num_warps on CUDA (None on
    Ascend, which ignores it)."""
    launch = sorted(warps) if cuda else [None]
    return [RowPlan(t, p, w) for t, p in itertools.product(sorted(tiles), sorted(programs)) for w in launch]


def _row_block(shape: Shape) -> int:
    """The column tile of a row launch at shape.size (kernels/norms.py, kernels/activation.py)."""
    import triton

    from qwen_vl_triton.kernels.norms import CHUNK, MAX_TILE

    n = shape.size
    if shape.op == "silu_and_mul":
        return min(triton.next_power_of_2(n), CHUNK)
    return triton.next_power_of_2(n) if n <= MAX_TILE else CHUNK


def distinct_plans(shape: Shape, plans: Sequence[AttentionPlan | RowPlan]) -> list[AttentionPlan | RowPlan]:
    """The plans of `plans` of the shape's kind (AttentionPlan / RowPlan), less those that launch
    exactly as an earlier one at `shape`: a decode tile is one query's padded heads whatever
    query_rows says, so there only key_tile (and warps / stages) matter; a cache block of
    shape.block_size keys caps the paged key tile (BLOCK_N) the same way, and a varlen key tile is
    capped by the longest sequence. A row tile stacks at most as many rows as the bucket has
    (target.rows_per_tile), and one row is one program whatever programs_per_core says."""
    seen, out = set(), []
    for p in plans:
        if isinstance(p, RowPlan) != shape.rows:
            continue
        if isinstance(p, RowPlan):
            import triton

            stacked = min(max(1, p.tile_elements // _row_block(shape)), triton.next_power_of_2(shape.bucket))
            key = (stacked, p.programs_per_core if shape.bucket > 1 else None, p.num_warps)
        else:
            query_rows = None if shape.op == "paged_decode" else p.query_rows
            cap = max(16, shape.bucket) if shape.op == "varlen" else shape.block_size
            key = (query_rows, min(p.key_tile, cap), p.num_warps, p.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def candidates(shapes: Sequence[Shape], plans: Sequence[AttentionPlan | RowPlan]) -> list[Candidate]:
    """Every (shape, plan) to try, plans that launch alike at a shape counted once."""
    return [Candidate(s, p) for s in shapes for p in distinct_plans(s, plans)]


class Dropped(Exception):
    """A candidate that cannot be kept; the message says why (compile error, spill, wrong output)."""


class Bench(Protocol):
    """What the sweep needs of a device (tests inject a fake)."""

    def measure(self, candidate: Candidate) -> float:
        """Median ms of the candidate's launch; raises Dropped when it cannot be kept."""

    def default_ms(self, shape: Shape) -> float:
        """Median ms of the launch with the Target's own plan (no plan file)."""

    def baseline_ms(self, shape: Shape) -> float:
        """Median ms of the bench's PyTorch baseline at this shape (a row op's eager reference)."""

    # Optional (sweep asks for it where the bench has it): compiled_ms(shape) -> float | None,
    # the median ms of torch.compile of a row op's reference (None: no such baseline here).


@dataclasses.dataclass
class Outcome:
    candidate: Candidate
    ms: float | None = None
    dropped: str | None = None


@dataclasses.dataclass
class BucketResult:
    """What the sweep learned about one shape: each candidate tried (timed or dropped, fastest
    first once sorted), the default plan's and the baseline's time."""

    shape: Shape
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    default_ms: float | None = None
    baseline_ms: float | None = None
    compiled_ms: float | None = None  # torch.compile of a row op's reference, where measured
    complete: bool = False  # every candidate tried (False: the time budget ran out)

    def ranked(self) -> list[Outcome]:
        """The timed candidates, fastest first."""
        return sorted((o for o in self.outcomes if o.ms is not None), key=lambda o: o.ms)

    @property
    def best(self) -> Outcome | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None


def sweep(shapes: Sequence[Shape], plans: Sequence[AttentionPlan | RowPlan], bench: Bench, deadline: float,
          log: Callable[[str], None] = print) -> list[BucketResult]:
    """Measure every candidate of every shape, the default plan and the baseline, until
    `deadline` (time.time()); a shape begun when the time runs out keeps what it measured."""
    results = []
    for shape in shapes:
        if time.time() >= deadline:
            log(f"time budget spent: {shape} and later buckets not swept")
            break
        result = BucketResult(shape)
        results.append(result)
        result.default_ms = _measured(lambda s=shape: bench.default_ms(s), log, f"{shape}: default plan")
        result.baseline_ms = _measured(lambda s=shape: bench.baseline_ms(s), log, f"{shape}: baseline")
        compiled = getattr(bench, "compiled_ms", None)
        if compiled is not None and shape.rows:
            result.compiled_ms = _measured(lambda s=shape, fn=compiled: fn(s), log, f"{shape}: torch.compile")
        todo = distinct_plans(shape, plans)
        for plan in todo:
            if time.time() >= deadline:
                log(f"time budget spent in {shape}: {len(result.outcomes)}/{len(todo)} candidates tried")
                break
            outcome = Outcome(Candidate(shape, plan))
            try:
                outcome.ms = bench.measure(outcome.candidate)
            except Dropped as why:
                outcome.dropped = str(why)
            result.outcomes.append(outcome)
            log(f"  {shape}: {plan_text(plan)}: " + (f"{outcome.ms:.4f} ms" if outcome.ms is not None
                                                      else f"dropped ({outcome.dropped})"))
        else:
            result.complete = True
    return results


def _measured(fn: Callable[[], float | None], log: Callable[[str], None], what: str) -> float | None:
    # The default plan and the baseline are for comparison only: a failure is noted, not fatal.
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - e.g. the baseline running out of memory
        log(f"{what} failed: {type(err).__name__}: {str(err)[:200]}")
        return None


Verifier = Callable[[list[Candidate]], dict[Candidate, str | None]]


def choose_winners(results: Sequence[BucketResult], verify: Verifier | None = None,
                   log: Callable[[str], None] = print) -> dict[Shape, Outcome]:
    """The fastest timed candidate of each shape; with `verify` (candidates -> why each fails,
    None when it passes), a winner that fails is marked dropped and the next fastest is tried."""
    winners: dict[Shape, Outcome] = {}
    pending = {r.shape: r.ranked() for r in results}
    while pending:
        picks = {shape: ranked[0] for shape, ranked in pending.items() if ranked}
        if not picks:
            break
        verdicts = verify([o.candidate for o in picks.values()]) if verify else {}
        pending = {}
        for shape, outcome in picks.items():
            why = verdicts.get(outcome.candidate)
            if why is None:
                winners[shape] = outcome
                continue
            log(f"{shape}: {plan_text(outcome.candidate.plan)} fails the compile check ({why}): next fastest")
            outcome.dropped, outcome.ms = f"compile check: {why}", None
            pending[shape] = next(r for r in results if r.shape == shape).ranked()
    return winners


def merged_table(winners: dict[Shape, Outcome], results: Sequence[BucketResult], previous: PlanTable) -> PlanTable:
    """The new file's plans: the winners, and the previous file's entries of every (op, head
    dim / width) this run did not sweep (a filtered run leaves the rest of the file as it was)."""
    swept = {(r.shape.op, r.shape.size) for r in results}
    kept = [e for e in previous.entries if (e.op, e.size) not in swept]
    entries = kept + [o.candidate.entry for o in winners.values()]
    # parse_plans' order, so that the table written equals the one read back.
    return PlanTable(tuple(sorted(entries, key=lambda e: (e.op, e.size, e.max_tokens))))


def write_plans(table: PlanTable, path: Path, arch: str, device: str, source: str) -> PlanTable:
    """Write `table` in the plan-file format (kernels/plans.py) and return it as read back."""
    data = table.to_json(arch, device, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return parse_plans(json.loads(path.read_text()), str(path))


def read_plans(path: Path) -> PlanTable:
    """The plans already in `path` (empty when there is no file)."""
    return parse_plans(json.loads(path.read_text()), str(path)) if path.is_file() else PlanTable()


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def row_bytes(shape: Shape, itemsize: int) -> int:
    """Bytes a row op must move at `shape` (inputs read + outputs written; the weights left out):
    as benchmarks/bench_elementwise.py counts them."""
    per_row = {"add_rms_norm": 4, "silu_and_mul": 3}.get(shape.op, 2)
    return per_row * shape.bucket * shape.size * itemsize


def report_rows(results: Sequence[BucketResult], winners: dict[Shape, Outcome], copy_gbs: float | None = None,
                itemsize: int = 2) -> list[dict]:
    """One table row per bucket: the best plan, its time, the default's and the baselines', and
    the speed-ups (>1: the best plan is faster); with `copy_gbs` (the device's measured copy
    bandwidth), a row op's best plan's fraction of it (`itemsize`-byte elements)."""
    rows = []
    for r in results:
        best = winners.get(r.shape)
        ms = best.ms if best else None
        tried = len(r.outcomes)
        row = {"op": r.shape.op, "size": r.shape.size, "heads": "-" if r.shape.rows else f"{r.shape.hq}/{r.shape.hk}",
               "bucket": r.shape.bucket, "best plan": plan_text(best.candidate.plan if best else None),
               "best ms": f"{ms:.4f}" if ms else "-",
               "default ms": f"{r.default_ms:.4f}" if r.default_ms else "-",
               "baseline ms": f"{r.baseline_ms:.4f}" if r.baseline_ms else "-",
               "compile ms": f"{r.compiled_ms:.4f}" if r.compiled_ms else "-",
               "default / best": _ratio(r.default_ms, ms), "baseline / best": _ratio(r.baseline_ms, ms),
               "compile / best": _ratio(r.compiled_ms, ms),
               "best frac copy bw": "-", "kept / tried": f"{sum(o.ms is not None for o in r.outcomes)}/{tried}"
                                                         + ("" if r.complete else " (budget)")}
        if r.shape.rows and ms and copy_gbs:
            row["best frac copy bw"] = f"{row_bytes(r.shape, itemsize) / (ms * 1e-3) / 1e9 / copy_gbs:.2f}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# On the device


def _plan_kernels() -> list:
    """The JITFunctions whose compiled kernels a plan decides: the attention modules' and the row
    ops' (norms, activation)."""
    from triton.runtime.jit import JITFunction

    from qwen_vl_triton.kernels import activation, attention_paged, attention_varlen, norms

    return [fn for module in (attention_varlen, attention_paged, norms, activation) for fn in vars(module).values()
            if isinstance(fn, JITFunction)]


def _forget_compiled(fns: list) -> None:
    """Empty the JITFunctions' in-memory kernel caches, so that the kernels cached after the next
    launch are exactly those it used (a recompile is a read of Triton's on-disk cache)."""
    for fn in fns:
        caches = getattr(fn, "device_caches", None)  # stock Triton 3.x
        if caches is not None:
            caches.clear()


def _spilled(fns: list) -> list[str]:
    """'name: N bytes' for each kernel in the JITFunctions' caches that spills registers (CUDA:
    n_spills, read by the driver when the kernel was loaded)."""
    out = []
    for fn in fns:
        for cache in getattr(fn, "device_caches", {}).values():
            for compiled in cache[0].values():
                spills = getattr(compiled, "n_spills", 0) or 0
                if spills > 0:
                    out.append(f"{compiled.name}: {spills} bytes spilled")
    return out


@dataclasses.dataclass
class Workload:
    """One shape's tensors on the device and its calls (outputs [tokens, Hq, D], or a row op's:
    add_rms_norm returns a tuple); compiled: torch.compile of a row op's reference, or None."""

    triton_run: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    reference: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    baseline: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]
    compiled: Callable[[], object] | None = None


def _row_workload(shape: Shape, device: torch.device, dtype: torch.dtype) -> Workload:
    """A row op over [rows, width] (silu_and_mul: [rows, 2 x width]); the baselines are its
    reference in eager PyTorch and (devices only) torch.compile of it (bench_elementwise)."""
    import torch

    from qwen_vl_triton import kernels
    from qwen_vl_triton.benchmarks.bench_elementwise import _compiled

    rows, n = shape.bucket, shape.size
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    args = {"rms_norm": lambda: (r(rows, n), r(n), EPS),
            "add_rms_norm": lambda: (r(rows, n), r(rows, n), r(n), EPS),
            "layer_norm": lambda: (r(rows, n), r(n), r(n), EPS),
            "silu_and_mul": lambda: (r(rows, 2 * n),)}[shape.op]()
    op = getattr(kernels, shape.op)
    if device.type != "cpu":
        torch._dynamo.reset()  # one compile per shape: the recompile limit would fall back to eager
    compiled = _compiled(op.reference, device)
    return Workload(lambda: op.__wrapped__(*args), lambda: op.reference(*args), lambda: op.reference(*args),
                    None if compiled is None else lambda: compiled(*args))


def make_workload(shape: Shape, device: torch.device, dtype: torch.dtype) -> Workload:
    """The tensors of `shape` (module docstring: Shapes) and the calls on them."""
    import torch

    from qwen_vl_triton import kernels
    from qwen_vl_triton.benchmarks import bench_attention as ba

    if shape.rows:
        return _row_workload(shape, device, dtype)
    d, hq, hk, n = shape.head_dim, shape.hq, shape.hk, shape.bucket
    g = torch.Generator(device="cpu").manual_seed(0)
    if shape.op == "varlen":
        lens = [n] * max(1, VARLEN_TOKENS // n)
        q, k, v = (torch.randn(sum(lens), h, d, generator=g).to(device, dtype) for h in (hq, hk, hk))
        cu, causal = ba._cu(lens, device), d == 128  # the LLM's prefill is causal, the ViT's is not
        per_sequence = ba._sdpa_per_sequence(q, k, v, lens, causal)

        def sdpa() -> torch.Tensor:
            with ba._sdpa_flash(device):
                return per_sequence()

        return Workload(lambda: ba.varlen_triton(q, k, v, cu, n, causal=causal),
                        lambda: kernels.varlen_attention.reference(q, k, v, cu, n, causal=causal), sdpa)
    if shape.op == "paged_decode":
        k_cache, v_cache, tables, lens = ba._paged_cache([CONTEXT] * n, hk, d, shape.block_size, dtype, device)
        q = torch.randn(n, hq, d, generator=g).to(device, dtype)
        return Workload(lambda: ba.decode_triton(q, k_cache, v_cache, tables, lens),
                        lambda: kernels.paged_attention.reference(q, k_cache, v_cache, tables, lens),
                        ba.decode_gather_sdpa(q, k_cache, v_cache, tables, CONTEXT))
    total = CONTEXT + n
    k_cache, v_cache, tables, lens = ba._paged_cache([total], hk, d, shape.block_size, dtype, device)
    q = torch.randn(n, hq, d, generator=g).to(device, dtype)
    cu_q = ba._cu([n], device)  # one sequence: its n new tokens after CONTEXT cached ones
    return Workload(lambda: ba.prefill_triton(q, k_cache, v_cache, tables, cu_q, lens),
                    lambda: kernels.paged_prefill_attention.reference(q, k_cache, v_cache, tables, cu_q, lens),
                    ba.prefill_gather_sdpa(q, k_cache, v_cache, tables, [total], n))


class DeviceBench:
    """Bench on a real device: one shape's workload at a time, each candidate launched under a
    Target whose only plan is the candidate's."""

    def __init__(self, device: torch.device, warmup: int = 5, reps: int = 20, dtype: torch.dtype | None = None):
        import torch

        from qwen_vl_triton.kernels.target import current_target

        self.device, self.warmup, self.reps = device, warmup, reps
        self.dtype = dtype or torch.bfloat16
        self.target = dataclasses.replace(current_target(device), plans=PlanTable())
        self.kernels = _plan_kernels()
        self._shape: Shape | None = None
        self._work: Workload | None = None
        self._expected: torch.Tensor | None = None

    def _workload(self, shape: Shape) -> Workload:
        if shape != self._shape:
            import torch

            self._work = self._expected = None  # free the previous shape's tensors first
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._work, self._shape = make_workload(shape, self.device, self.dtype), shape
            self._expected = _outputs(self._work.reference())
        return self._work

    def _time(self, fn: Callable[[], object]) -> float:
        from qwen_vl_triton.benchmarks.common import median_ms

        return median_ms(fn, self.device, warmup=self.warmup, reps=self.reps)

    def measure(self, candidate: Candidate) -> float:
        import torch

        from qwen_vl_triton.kernels.target import use_target

        work = self._workload(candidate.shape)
        target = dataclasses.replace(self.target, plans=PlanTable((candidate.entry,)))
        with use_target(target):
            _forget_compiled(self.kernels)
            try:
                out = work.triton_run()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
            except Exception as err:  # noqa: BLE001 - OutOfResources, a compile error, a launch failure
                from qwen_vl_triton.benchmarks.compile_check.check import error_summary

                raise Dropped(error_summary(err)) from None
            spills = _spilled(self.kernels)
            if spills:
                raise Dropped("; ".join(spills))
            outs = _outputs(out)
            if not all(torch.allclose(o, e, atol=ATOL, rtol=RTOL) for o, e in zip(outs, self._expected, strict=True)):
                err = max(float((o - e).abs().nan_to_num(float("inf")).max())
                          for o, e in zip(outs, self._expected, strict=True))
                raise Dropped(f"max |out - reference| = {err:.3g}")
            return self._time(work.triton_run)

    def default_ms(self, shape: Shape) -> float:
        from qwen_vl_triton.kernels.target import use_target

        work = self._workload(shape)
        with use_target(self.target):
            return self._time(work.triton_run)

    def baseline_ms(self, shape: Shape) -> float:
        return self._time(self._workload(shape).baseline)

    def compiled_ms(self, shape: Shape) -> float | None:
        compiled = self._workload(shape).compiled
        return None if compiled is None else self._time(compiled)


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A launch's output(s) in fp32, as a tuple (add_rms_norm returns two tensors)."""
    return tuple(o.float() for o in (out if isinstance(out, tuple) else (out,)))


# ---------------------------------------------------------------------------------------------
# Compile-only (no device): the compile check's machinery in a subprocess


def compile_launches(candidate: Candidate, all_variants: bool) -> list:
    """The launches compiled for `candidate` (compile_check.launches.Launch on meta tensors): its
    tune shape in bf16 and, with all_variants, what `make compile-check` compiles
    for a committed plan (launches.plan_launches: fp16 and bf16, cache blocks 16..128). A row
    op's tune shape is the launch plan_launches makes for its entry (its bucket's rows)."""
    import torch

    from qwen_vl_triton import kernels
    from qwen_vl_triton.benchmarks.compile_check.launches import Launch, _cu, _row_plan_launches, _t, plan_launches

    s, dt = candidate.shape, torch.bfloat16
    if s.rows:
        return plan_launches(PlanTable((candidate.entry,))) if all_variants else _row_plan_launches(candidate.entry, dt)
    d, n = s.head_dim, s.bucket
    if s.op == "varlen":
        lens = [n] * max(1, VARLEN_TOKENS // n)
        call = lambda: kernels.varlen_attention(_t(sum(lens), s.hq, d, dtype=dt), _t(sum(lens), s.hk, d, dtype=dt),  # noqa: E731
                                                _t(sum(lens), s.hk, d, dtype=dt), _cu(lens), n, causal=d == 128)
    else:
        blocks = -(-(CONTEXT + (n if s.op == "paged_prefill" else 0)) // s.block_size)
        cache = _t(blocks * (n if s.op == "paged_decode" else 1), s.block_size, s.hk, d, dtype=dt)
        if s.op == "paged_prefill":
            call = lambda: kernels.paged_prefill_attention(_t(n, s.hq, d, dtype=dt), cache, cache,  # noqa: E731
                                                           _t(1, blocks, dtype=torch.int32), _cu([n]),
                                                           _t(1, dtype=torch.int32))
        else:
            call = lambda: kernels.paged_attention(_t(n, s.hq, d, dtype=dt), cache, cache,  # noqa: E731
                                                   _t(n, blocks, dtype=torch.int32), _t(n, dtype=torch.int32))
    out = [Launch(f"tune {s}", s.op, plan_text(candidate.plan), dt, call)]
    return out + (plan_launches(PlanTable((candidate.entry,))) if all_variants else [])


def _candidate_json(c: Candidate) -> dict:
    return {"shape": dataclasses.asdict(c.shape), "plan": dataclasses.asdict(c.plan)}


def _candidate_from_json(d: dict) -> Candidate:
    shape = Shape(**d["shape"])
    return Candidate(shape, (RowPlan if shape.rows else AttentionPlan)(**d["plan"]))


def compile_worker(arch: str, path: Path) -> int:
    """In a process without TRITON_INTERPRET: compile each candidate of `path` (JSON: {"all":
    bool, "candidates": [...]}) for `arch` and print one JSON line: per candidate, why it fails
    the compile check (compile error, spill, shared memory / UB over the limit) or null."""
    from qwen_vl_triton.benchmarks.compile_check.check import run_target
    from qwen_vl_triton.kernels.target import KNOWN_TARGETS

    job = json.loads(path.read_text())
    verdicts = []
    for item in job["candidates"]:
        c = _candidate_from_json(item)
        target = dataclasses.replace(KNOWN_TARGETS[arch], plans=PlanTable((c.entry,)))
        report = run_target(target, launches=compile_launches(c, job["all"]))
        problems = sorted({p for v in report.failures() for p in v.problems()})
        verdicts.append("; ".join(problems) or None)
    print(json.dumps(verdicts), flush=True)
    return 0


def compile_verdicts(arch: str, cands: Sequence[Candidate], all_variants: bool = False,
                     timeout: float = 3600) -> dict[Candidate, str | None]:
    """Compile `cands` for `arch` (sm_80 / sm_90) with the compile check's compile-only driver, in
    a subprocess (the driver replaces Triton's for good, and the interpreter must be off there):
    candidate -> why it fails, or None."""
    if not cands:
        return {}
    with tempfile.TemporaryDirectory(prefix="qvl-tune-") as tmp:
        job = Path(tmp) / "candidates.json"
        job.write_text(json.dumps({"all": all_variants, "candidates": [_candidate_json(c) for c in cands]}))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), env.get("PYTHONPATH")]))
        run = subprocess.run([sys.executable, "-m", "qwen_vl_triton.benchmarks.tune", "--compile-worker", arch,
                              "--worker-json", str(job)], capture_output=True, text=True, env=env, cwd=CHECKOUT,
                             timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"the compile for {arch} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return dict(zip(cands, json.loads(run.stdout.strip().splitlines()[-1]), strict=True))


# ---------------------------------------------------------------------------------------------
# The command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _ops(text: str) -> list[str]:
    ops = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [o for o in ops if o not in ALL_OPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {', '.join(unknown)}; known: {', '.join(ALL_OPS)}")
    return ops


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/tune.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--ops", type=_ops, default=list(ALL_OPS),
                   help=f"comma-separated ops (default: {','.join(ALL_OPS)})")
    p.add_argument("--head-dims", type=_ints, default=None,
                   help="comma-separated head dims of the attention ops (default: 128,80)")
    p.add_argument("--widths", type=_ints, default=None,
                   help="comma-separated row widths of the row ops (default: the released ones, e.g. 3584,1280 for "
                        "rms_norm, 18944,3420 for silu_and_mul's N)")
    p.add_argument("--buckets", type=_ints, default=None,
                   help="comma-separated bucket values; each op keeps those of its own BUCKETS (default: all: "
                        + "; ".join(f"{op} {','.join(map(str, b))}" for op, b in BUCKETS.items()) + ")")
    p.add_argument("--query-rows", type=_ints, default=list(QUERY_ROWS), help="query_rows to sweep (default 32,64,128)")
    p.add_argument("--key-tiles", type=_ints, default=list(KEY_TILES), help="key_tile to sweep (default 32,64,128)")
    p.add_argument("--warps", type=_ints, default=list(SWEEP_WARPS), help="num_warps to sweep on CUDA (default 4,8)")
    p.add_argument("--stages", type=_ints, default=list(SWEEP_STAGES),
                   help="num_stages to sweep on CUDA (default 2,3,4)")
    p.add_argument("--row-tiles", type=_ints, default=list(ROW_TILES),
                   help=f"row plans' tile_elements to sweep (default {','.join(map(str, ROW_TILES))})")
    p.add_argument("--row-programs", type=_ints, default=list(ROW_PROGRAMS),
                   help=f"row plans' programs_per_core to sweep (default {','.join(map(str, ROW_PROGRAMS))})")
    p.add_argument("--row-warps", type=_ints, default=list(ROW_WARPS),
                   help=f"row plans' num_warps to sweep on CUDA (default {','.join(map(str, ROW_WARPS))})")
    p.add_argument("--model", default=HEADS_MODEL,
                   help=f"checkpoint of benchmarks/model_shapes.json whose heads and widths (tp1) the shapes use "
                        f"(default {HEADS_MODEL})")
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128), default=BLOCK_SIZE,
                   help=f"paged cache block size of the shapes (default {BLOCK_SIZE}, the engine's); a paged key "
                        "tile is capped at one block, so at 16 only query_rows and warps / stages differ there")
    p.add_argument("--max-minutes", type=float, default=6.0,
                   help="sweep budget; when spent the sweep stops and what it measured is written (default 6)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per median (default 20)")
    p.add_argument("--out", type=Path, default=None,
                   help="plan file to write (default qwen_vl_triton/kernels/plans/<arch>.json)")
    p.add_argument("--no-verify", action="store_true",
                   help="on sm_80 / sm_90, skip compiling the winners as `make compile-check` does")
    p.add_argument("--dry-run", action="store_true",
                   help="list every (op, head dim / width, bucket, candidate) it would try; no device needed")
    p.add_argument("--arch", default="sm_90",
                   help="with --dry-run: the arch whose tile space is listed (sm_*: with warps (and stages); "
                        "Ascend*: tiles only; default sm_90)")
    p.add_argument("--compile-only", metavar="ARCH", choices=("sm_80", "sm_90"),
                   help="with --dry-run: compile each candidate for ARCH (sm_80 or sm_90) on this machine, no GPU "
                        "needed, drop those that spill or fail, print the survivors per bucket")
    p.add_argument("--compile-all", action="store_true",
                   help="with --compile-only: also compile each candidate as a committed plan is compiled by "
                        "`make compile-check` (fp16 and bf16, cache blocks 16..128; slower)")
    p.add_argument("--compile-worker", metavar="ARCH", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", type=Path, help=argparse.SUPPRESS)
    return p


def all_plans(args: argparse.Namespace, cuda: bool) -> list[AttentionPlan | RowPlan]:
    """The attention and the row candidates the command line asks for."""
    return [*candidate_plans(cuda, args.query_rows, args.key_tiles, args.warps, args.stages),
            *row_candidate_plans(cuda, args.row_tiles, args.row_programs, args.row_warps)]


def dry_run(args: argparse.Namespace, shapes: list[Shape], plans: list[AttentionPlan | RowPlan]) -> int:
    """List the candidates (and, with --compile-only, compile them and count survivors)."""
    cands = candidates(shapes, plans)
    verdicts: dict[Candidate, str | None] = {}
    if args.compile_only:
        print(f"compiling {len(cands)} candidates for {args.compile_only} (no GPU needed) ...", flush=True)
        verdicts = compile_verdicts(args.compile_only, cands, args.compile_all)
    for c in cands:
        verdict = "" if c not in verdicts else "  fits" if verdicts[c] is None else f"  DROPPED: {verdicts[c]}"
        print(f"{c.shape}: {plan_text(c.plan)}{verdict}")
    print(f"{len(cands)} candidates in {len(shapes)} bucket(s)")
    if args.compile_only:
        for s in shapes:
            mine = [c for c in cands if c.shape == s]
            print(f"  {s}: {sum(verdicts[c] is None for c in mine)}/{len(mine)} survive {args.compile_only}")
    return 0


def _device() -> torch.device | None:
    from qwen_vl_triton.parallel.group import detect_device_type  # imports no triton

    kind = detect_device_type()
    if kind == "cpu":
        return None
    import torch

    return torch.device(kind, 0)


def run_on_device(args: argparse.Namespace, device: torch.device, shapes: list[Shape]) -> int:
    """Sweep, choose, write the plan file and the table (module docstring)."""
    import torch
    import triton

    from qwen_vl_triton.benchmarks.common import device_name, markdown_table

    bench = DeviceBench(device, reps=args.reps)
    arch, cuda = bench.target.arch, bench.target.backend == "cuda"
    plans = all_plans(args, cuda)
    print(f"tuning {len(candidates(shapes, plans))} candidates in {len(shapes)} buckets on {arch} "
          f"(budget {args.max_minutes} min)", flush=True)
    results = sweep(shapes, plans, bench, time.time() + 60 * args.max_minutes)
    verify = None
    if cuda and arch in ("sm_80", "sm_90") and not args.no_verify:
        def verify(cands: list[Candidate]) -> dict[Candidate, str | None]:
            return compile_verdicts(arch, cands, all_variants=True)
    winners = choose_winners(results, verify)
    out = args.out or PLAN_DIR / f"{arch}.json"
    raw_name = torch.cuda.get_device_name(device) if cuda else device_name(device)
    source = (f"benchmarks/tune.py {datetime.date.today().isoformat()} torch {torch.__version__} "
              f"triton {triton.__version__}")
    written = write_plans(merged_table(winners, results, read_plans(out)), out, arch, raw_name, source)
    copy_gbs = None
    if any(s.rows for s in shapes):
        from qwen_vl_triton.benchmarks.common import measure_copy_bandwidth

        copy_gbs = measure_copy_bandwidth(device, 256 << 20)
    rows = report_rows(results, winners, copy_gbs, bench.dtype.itemsize)
    table = markdown_table(rows)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = RESULTS_DIR / f"tune-{device_name(device)}.md"
    bw = f"copy bandwidth {copy_gbs:.0f} GB/s; " if copy_gbs else ""
    md.write_text(f"# Plans tuned on {raw_name} ({arch})\n\n{source}; bf16, cache block {args.block_size}; {bw}"
                  f"times are medians in ms; ratios > 1: the best plan is faster. Plans: {out.name} "
                  f"({len(written.entries)} entries).\n\n{table}\n")
    print(f"wrote {out} ({len(written.entries)} plans) and {md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """0 when done, 2 when there is no device to tune on (and no --dry-run)."""
    args = parser().parse_args(argv)
    if args.compile_worker:
        return compile_worker(args.compile_worker, args.worker_json)
    shapes = tune_shapes(args.ops, args.head_dims, args.buckets, args.model, args.block_size, args.widths)
    if not shapes:
        print("no bucket matches the filters (--ops / --head-dims / --widths / --buckets)", file=sys.stderr)
        return 2
    if args.dry_run or args.compile_only:
        cuda = (args.compile_only or args.arch).startswith("sm_")
        return dry_run(args, shapes, all_plans(args, cuda))
    device = _device()
    if device is None:
        print("tune needs an NVIDIA GPU (a CUDA build of torch and triton) or an Ascend NPU (torch_npu and "
              "triton-ascend) to time the candidates; none is visible here. Without one: --dry-run lists the "
              "candidates, --dry-run --compile-only sm_90 also drops those that spill.", file=sys.stderr)
        return 2
    return run_on_device(args, device, shapes)


if __name__ == "__main__":
    sys.exit(main())
