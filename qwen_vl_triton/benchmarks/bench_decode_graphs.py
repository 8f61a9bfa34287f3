"""Decode steps eager against captured graphs (engine/decode_graphs.py), on a CUDA or NPU device.

    python benchmarks/bench_decode_graphs.py            # the cpu-small checkpoint, 1..64 sequences

For each batch size: the same greedy requests through LLM(enforce_eager=True) and through the
default LLM (graphs captured per bucket), and the median decode-step time of each (the first
steps excluded: they capture). Token agreement is tests/engine/test_decode_graphs.py's (run by
`make device-check`). On the CPU there is nothing to capture: the script says so and exits.
"""

from __future__ import annotations

import statistics

BATCHES = (1, 8, 32, 64)
MAX_TOKENS = 64


def decode_step_ms(device: str, batch: int, enforce_eager: bool) -> float:
    """Median decode-step milliseconds of `batch` text requests."""
    import time

    from qwen_vl_triton.benchmarks.workloads import checkpoint_for
    from qwen_vl_triton.engine.llm import LLM, Prompt
    from qwen_vl_triton.engine.sampling import SamplingParams

    llm = LLM(checkpoint_for("cpu-small", "float32"), device=device, dtype="bfloat16", kv_cache_gb=4.0,
              max_batch_size=batch, enforce_eager=enforce_eager)
    for i in range(batch):
        llm.add_request(str(i), llm.preprocessor.prepare(Prompt(f"Tell me story {i} about the sea."),
                                                         SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
    times = []
    while llm.has_unfinished():
        decoding = all(s.num_computed == s.num_tokens - 1 for s in llm.scheduler.running) and not llm.scheduler.waiting
        started = time.perf_counter()
        llm.step()
        if decoding:
            times.append(time.perf_counter() - started)
    return statistics.median(times[4:]) * 1e3


def main() -> None:
    from qwen_vl_triton.parallel.group import detect_device_type

    device = detect_device_type()
    if device == "cpu":
        print("no CUDA or NPU device: nothing to capture (decode graphs are a device feature)")
        return
    print(f"{'batch':>5s} {'eager ms/step':>14s} {'graphs ms/step':>15s} {'speedup':>8s}")
    for batch in BATCHES:
        eager = decode_step_ms(device, batch, True)
        graphs = decode_step_ms(device, batch, False)
        print(f"{batch:5d} {eager:14.3f} {graphs:15.3f} {eager / graphs:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
