"""Decode throughput with structured outputs: 32 greedy text requests, none or half constrained.

32 short text prompts, 64 output tokens each (ignore_eos: the unconstrained requests run to the
full length), greedy, all admitted at once. Run (a): no constraints. Run (b): 16 of the 32 requests
constrained by a JSON schema (an object with a string of 40..80 characters and 4..12 integers, so
that the constrained requests do not finish at once; a constrained request may still end before 64
tokens when its object is complete, so throughput counts the tokens actually generated). The
constrained requests pay for llguidance's mask of each of their rows every step (on its thread
pool), the host-to-device copy of those rows and their unpacking in the sampler.

Medians over 3 repetitions of output tokens per second (wall time of LLM.generate over all 32);
(a) and (b) alternate. The model is the e2e family's random-weight cpu-small checkpoint (float32)
on any device, as the itl family uses: a small model's short steps show the per-step cost of the
masks at its largest. Its tokenizer is the tiny test tokenizer (~530 tokens): llguidance's mask
cost grows with the vocabulary, so with Qwen's 151k tokens the constrained rows cost more than here.

    python benchmarks/bench_structured.py [REPEATS]     # prints the table
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REQUESTS = 32
CONSTRAINED = 16
MAX_TOKENS = 64
REPEATS = 3
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 40, "maxLength": 80},
        "values": {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 12},
    },
    "required": ["title", "values"],
    "additionalProperties": False,
}
RUNS = ("none constrained", f"{CONSTRAINED} of {REQUESTS} constrained")


def run_once(llm, constrained: int) -> dict:
    """One LLM.generate of REQUESTS prompts, the first `constrained` of them under SCHEMA."""
    from engine.sampling import SamplingParams
    from engine.structured import StructuredOutput

    plain = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    schema = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    prompts = [f"Describe item number {i} as a JSON object." for i in range(REQUESTS)]
    params = [schema] * constrained + [plain] * (REQUESTS - constrained)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - started
    tokens = sum(len(o.output_ids) for o in outputs)
    constrained_tokens = [len(o.output_ids) for o in outputs[:constrained]]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "constrained_mean_tokens": statistics.mean(constrained_tokens) if constrained else 0.0}


def measure(device: str, repeats: int = REPEATS) -> dict:
    """Both runs, `repeats` times each, alternating; medians of their statistics."""
    from benchmarks.e2e_vs_hf import checkpoint_for
    from engine.llm import LLM

    llm = LLM(checkpoint_for("cpu-small", "float32"), device=device, kv_cache_gb=1.0, enable_prefix_caching=False,
              max_batch_size=REQUESTS)
    run_once(llm, CONSTRAINED)  # warm-up, and the schema's compilation (cached from then on)
    runs: dict[str, list[dict]] = {name: [] for name in RUNS}
    for _ in range(repeats):
        runs[RUNS[0]].append(run_once(llm, 0))
        runs[RUNS[1]].append(run_once(llm, CONSTRAINED))
    return {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}


def run(ctx) -> None:
    """`make bench` entry."""
    result = measure(ctx.device.type)
    base_ms = 1e3 / result[RUNS[0]]["tok_s"]
    for name, r in result.items():
        ms = 1e3 / r["tok_s"]
        ctx.record("structured", "ms per output token, 32 greedy requests x 64 tokens", "cpu-small", "float32",
                   name, ms, baseline_ms=base_ms,
                   note=f"{r['tok_s']:.1f} tok/s, {r['tokens']:.0f} tokens in {r['wall_s']:.2f} s"
                        + (f", constrained requests {r['constrained_mean_tokens']:.1f} tokens on average"
                           if r["constrained_mean_tokens"] else ""))


def main() -> None:
    import torch

    from parallel.group import detect_device_type

    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else REPEATS
    device = detect_device_type()
    print(f"device {device}, {torch.get_num_threads()} torch threads, {repeats} repetitions")
    result = measure(device, repeats)
    base = result[RUNS[0]]["tok_s"]
    print("| run | output tok/s | tokens | wall (s) | constrained requests' mean tokens | tok/s / none constrained |")
    print("|---|---|---|---|---|---|")
    for name, r in result.items():
        print(f"| {name} | {r['tok_s']:.1f} | {r['tokens']:.0f} | {r['wall_s']:.2f} | "
              f"{r['constrained_mean_tokens']:.1f} | {r['tok_s'] / base:.3f} |")


if __name__ == "__main__":
    main()
