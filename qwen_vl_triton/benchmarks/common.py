"""Shared benchmark harness: timing, measured copy bandwidth, and the results file.

Every bench module exposes `run(ctx: BenchContext) -> None` and records rows with `ctx.record`.
Times are medians over repetitions; bandwidth figures are fractions of the copy bandwidth
measured in the same run on the same device, so numbers from different machines compare.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen_vl_triton.benchmarks import RESULTS_DIR


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of `fn()` in milliseconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the device, e.g. 'NVIDIA-H100-80GB-HBM3' or 'cpu-interpreter'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "npu":
        name = torch.npu.get_device_name(device)  # type: ignore[attr-defined]
    else:
        name = f"cpu-interpreter-{platform.machine()}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def measure_copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth in GB/s (bytes read + bytes written per second) of a plain clone."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, reps=10 if device.type != "cpu" else 3)
    return 2 * nbytes / (ms * 1e-3) / 1e9


@dataclass
class BenchContext:
    """What a bench module needs: the device, whether this is a smoke run, and the recorder."""

    device: torch.device
    smoke: bool
    copy_gbs: float
    rows: list[dict] = field(default_factory=list)

    @property
    def reps(self) -> int:
        return 3 if self.smoke else 50

    def time(self, fn: Callable[[], object]) -> float:
        """Median milliseconds of fn on this context's device."""
        return median_ms(fn, self.device, warmup=1 if self.smoke else 10, reps=self.reps)

    def record(self, family: str, op: str, shape: str, dtype: torch.dtype, impl: str, ms: float,
               nbytes: float | None = None, flops: float | None = None, baseline_ms: float | None = None,
               note: str = "") -> dict:
        """Record one measurement; derived GB/s, fraction of copy bandwidth, TFLOP/s and the speed
        ratio against `baseline_ms` (>1 = faster than the baseline) are computed here."""
        row = {"family": family, "op": op, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
               "impl": impl, "median_ms": round(ms, 5)}
        if nbytes is not None:
            gbs = nbytes / (ms * 1e-3) / 1e9
            row["GB/s"] = round(gbs, 2)
            row["frac_copy_bw"] = round(gbs / self.copy_gbs, 3)
        if flops is not None:
            row["TFLOP/s"] = round(flops / (ms * 1e-3) / 1e12, 4)
        if baseline_ms is not None:
            row["speedup_vs_baseline"] = round(baseline_ms / ms, 3)
        if note:
            row["note"] = note
        self.rows.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        return row


def markdown_table(rows: list[dict]) -> str:
    """Rows as one markdown table (columns: the union of the rows' keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(ctx: BenchContext, extra: dict) -> Path:
    """Write results/<device>.json and results/<device>.md; returns the JSON path.

    extra["families"] names the families this run measured: the rows of other families already in
    the file are kept (a `--only` run updates its own rows), and meta["families_rerun"] says which
    rows are this run's."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = device_name(ctx.device)
    path = RESULTS_DIR / f"{name}.json"
    rerun = list(extra.get("families", []))
    previous = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "rows": []}
    kept = [r for r in previous["rows"] if r.get("family") not in rerun]
    families = [f for f in previous["meta"].get("families", []) if f not in rerun] + rerun
    meta = {"device": name, "smoke": ctx.smoke, "copy_bandwidth_GBps": round(ctx.copy_gbs, 2),
            "torch": torch.__version__, **extra, "families": families, "families_rerun": rerun}
    rows = kept + ctx.rows
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    header = f"# Benchmarks on {name}\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
    if ctx.smoke:
        header += ("**Smoke run on the CPU through Triton's interpreter: these timings prove the "
                   "benchmarks run; they are not performance figures.**\n\n")
    (RESULTS_DIR / f"{name}.md").write_text(header + markdown_table(rows) + "\n")
    return path
