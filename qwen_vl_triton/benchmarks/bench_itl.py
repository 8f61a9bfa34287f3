"""Inter-token latency of running streams while a five-minute clip is admitted.

Eight greedy text streams decode; once each has a few tokens, a request with a 5-minute clip (2 fps:
600 frames, 300 temporal slices) arrives. Its preparation (hashing the file, reading its header)
runs on a worker thread as the server's does; its frames are decoded on the engine's background
thread and encoded over many steps, then its prompt is prefilled in chunks of at most
`max_prefill_tokens` (256 here).
The window ends at the clip's first token. ITL = the gaps between consecutive tokens of the eight
streams inside the window; the baseline is the same streams over a window of the same length with
no clip. The clip runs differ in their step budgets (RUNS): both (`--prefill_step_share 0.25`:
on a CPU a prompt token costs ~2 ms against a ~40 ms decode step, so an unbounded 256-token chunk
stalls the streams by itself), the default flags (no prefill budget), and the prefill budget
without the vision one (`vision_step_share` 1e9: whatever frames are decoded, in one step).

Medians over 3 repetitions of each run's p50 / p99. Prefix and encoder caches are off, so every
repetition does all the work. On the CPU the engine runs its PyTorch paths (a CPU user's setting)
on the e2e family's cpu-small checkpoint; the clip is 320x240 at 10 fps (3,000 frames to decode),
sampled at 2 fps into 4 merged tokens a frame pair (1,200 video tokens).

    python benchmarks/bench_itl.py [REPEATS]       # prints the table
"""

from __future__ import annotations

import dataclasses
import queue
import statistics
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

STREAMS = 8
WARM_TOKENS = 8
REPEATS = 3
CLIP_SECONDS = 300
CLIP_OPTIONS = {"min_pixels": 4 * 784, "max_pixels": 4 * 784}  # 2 fps (the default): 600 frames
MAX_PREFILL_TOKENS = 256
# (name, vision_step_share, prefill_step_share): the baseline, both budgets, the defaults (no prefill
# budget), and the prefill budget without the vision one (what the vision budget holds back)
RUNS = [("no clip", 0.25, None),
        ("clip, --prefill_step_share 0.25", 0.25, 0.25),
        ("clip, default flags", 0.25, None),
        ("clip, prefill budget, no vision budget", 1e9, 0.25)]


def _clip() -> Path:
    from qwen_vl_triton.testing.media import write_synthetic_video
    from qwen_vl_triton.testing.tiny_checkpoint import cache_dir

    path = cache_dir() / "bench-itl-5min.mp4"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.mp4")
        write_synthetic_video(tmp, seconds=CLIP_SECONDS, fps=10, width=320, height=240)
        tmp.rename(path)
    return path


def run_window(llm, clip: Path | None, window_s: float | None) -> dict:
    """Eight streams, then (with `clip`) the clip's request until its first token, or (without)
    `window_s` seconds of decoding. ITL statistics of the streams inside the window."""
    from qwen_vl_triton.engine.llm import Prompt
    from qwen_vl_triton.engine.media import Media
    from qwen_vl_triton.engine.report import percentiles
    from qwen_vl_triton.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)  # run until aborted
    ids = [f"stream{i}" for i in range(STREAMS)]
    for i, request_id in enumerate(ids):
        llm.add_request(request_id, llm.preprocessor.prepare(Prompt(f"Tell me story number {i} about the sea."),
                                                             params))
    while min(len(llm.sequences[r].output_ids) for r in ids) < WARM_TOKENS:
        llm.step()
    seqs = [llm.sequences[r] for r in ids]
    prepared: queue.SimpleQueue = queue.SimpleQueue()
    started = time.perf_counter()
    if clip is not None:
        preprocessor = llm.preprocessor.with_own_tokenizer(llm.path, "max_input_length")  # as the server does
        request = Prompt("Describe the clip.", [Media(clip, options=CLIP_OPTIONS)])
        threading.Thread(target=lambda: prepared.put(preprocessor.prepare(request, SamplingParams(max_tokens=2))),
                         daemon=True).start()
    clip_seq = None
    while True:
        if clip is not None and clip_seq is None and not prepared.empty():
            llm.add_request("clip", prepared.get())
            clip_seq = llm.sequences["clip"]
        llm.step()
        if clip_seq is not None and clip_seq.output_ids:
            break
        if clip is None and time.perf_counter() - started >= window_s:
            break
    ended = time.perf_counter()
    gaps = [b - a for s in seqs for a, b in pairwise(s.token_times) if a >= started and b <= ended]
    for request_id in [*ids, "clip"]:
        llm.abort(request_id)
    while llm.has_unfinished():
        llm.step()
    cuts = percentiles(gaps, (50, 99))
    return {"window_s": ended - started, "gaps": len(gaps), "p50_ms": cuts["p50"] * 1e3,
            "p99_ms": cuts["p99"] * 1e3, "max_ms": max(gaps) * 1e3,
            "clip_tokens": len(clip_seq.prompt_ids) if clip_seq is not None else 0}


def measure(device: str, repeats: int = REPEATS) -> dict:
    """The four runs, `repeats` times each, interleaved; medians of their statistics."""
    from qwen_vl_triton.benchmarks.workloads import checkpoint_for
    from qwen_vl_triton.engine.llm import LLM

    clip = _clip()
    llm = LLM(checkpoint_for("cpu-small", "float32"), device=device, kv_cache_gb=1.0, enable_prefix_caching=False,
              encoder_cache_gb=0.0, max_prefill_tokens=MAX_PREFILL_TOKENS)
    run_window(llm, None, 1.0)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in RUNS}
    for _ in range(repeats):
        for name, vision_share, prefill_share in RUNS[1:]:
            # the step budgets are the engine config's: _plan_step reads them at every step
            llm.engine_config = dataclasses.replace(llm.engine_config, vision_step_share=vision_share,
                                                    prefill_step_share=prefill_share)
            runs[name].append(run_window(llm, clip, None))
        runs["no clip"].append(run_window(llm, None, runs[RUNS[1][0]][-1]["window_s"]))
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def run(ctx) -> None:
    """`make bench` entry."""
    result = measure(ctx.device.type)
    base = result["no clip"]["p99_ms"]
    for name, r in result.items():
        row = ctx.record("itl", "ITL p99 of 8 streams", "cpu-small, 5-min clip admitted", "float32", name,
                         r["p99_ms"], note=f"p50 {r['p50_ms']:.1f} ms, max {r['max_ms']:.1f} ms, "
                                           f"window {r['window_s']:.1f} s, {r['gaps']:.0f} gaps")
        row["speedup_vs_baseline"] = round(base / r["p99_ms"], 3)
        print(f"  {name:40s} p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  max {r['max_ms']:7.1f} ms  "
              f"window {r['window_s']:5.1f} s  p99 / no clip {r['p99_ms'] / base:.2f}x", flush=True)


def main() -> None:
    import torch

    from qwen_vl_triton.parallel.group import detect_device_type

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else REPEATS
    device = detect_device_type()
    print(f"device {device}, {torch.get_num_threads()} torch threads, {repeats} repetitions")
    result = measure(device, repeats)
    base = result["no clip"]["p99_ms"]
    print("| run | ITL p50 (ms) | ITL p99 (ms) | max (ms) | window (s) | p99 / no clip |")
    print("|---|---|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | {r['window_s']:.1f} | "
              f"{r['p99_ms'] / base:.2f}x |")


if __name__ == "__main__":
    main()
