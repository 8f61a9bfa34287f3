"""Performance summary of a finished batch of requests, as generate.py and the benchmarks print it."""

from __future__ import annotations

import resource
import statistics
from collections.abc import Sequence

import torch

from qwen_vl_triton.engine.llm import LLM
from qwen_vl_triton.engine.outputs import RequestOutput


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ...} by linear interpolation (empty -> {})."""
    if not values:
        return {}
    if len(values) == 1:
        return {f"p{p}": float(values[0]) for p in ps}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {f"p{p}": float(cuts[p - 1]) for p in ps}


def peak_memory_gb(device: torch.device) -> float:
    """Peak device memory allocated (GPU/NPU) or the process's peak resident set (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1 << 30)
    if device.type == "npu":
        return torch.npu.max_memory_allocated(device) / (1 << 30)  # type: ignore[attr-defined]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # ru_maxrss is KiB on Linux


def perf_summary(outputs: Sequence[RequestOutput], wall_s: float, llm: LLM) -> dict:
    """Throughput and latency of a finished batch: requests/s, output tokens/s, time to first
    token and time per output token (p50/p90/p99), the engine's time split, KV blocks used,
    preemptions and encoder-cache hits (media encoded once for all requests that repeat it).
    Output tokens count every sample of each request (n > 1); time to first token is per request,
    time per output token per sample (from its first token to its last: its token_times)."""
    out_tokens = sum(o.completion_tokens for o in outputs)
    ttft = [o.ttft_s for o in outputs if o.ttft_s is not None]
    tpot = [(s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1) for o in outputs
            for s in o.outputs if len(s.token_times) > 1]
    stats = llm.stats
    return {
        "requests": len(outputs),
        "wall_s": round(wall_s, 4),
        "requests_per_s": round(len(outputs) / wall_s, 4),
        "prompt_tokens": sum(o.prompt_tokens for o in outputs),
        "cached_prompt_tokens": sum(o.cached_prompt_tokens for o in outputs),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / wall_s, 3),
        "ttft_s": {k: round(v, 4) for k, v in percentiles(ttft).items()},
        "tpot_s": {k: round(v, 5) for k, v in percentiles(tpot).items()},
        "vision_encoder_s": round(stats.vision_s, 4),
        # host seconds of the engine's steps by phase (engine/stats.py, STEP_PHASES); "other":
        # bookkeeping, the rest of the steps' time
        "step_profile_s": {**{k: round(v, 4) for k, v in stats.phase_s.items()},
                           "other": round(max(0.0, stats.step_s - sum(stats.phase_s.values())), 4)},
        "prefill_s": round(stats.prefill.seconds, 4),
        "decode_s": round(stats.decode.seconds, 4),
        "decode_tokens_per_s": round(stats.decode.tokens / stats.decode.seconds, 3) if stats.decode.seconds
        else None,
        "kv_blocks_total": llm.blocks.num_blocks,
        "kv_blocks_peak_used": stats.max_blocks_used,
        "preemptions": llm.scheduler.num_preemptions,
        "encoder_cache_hits": llm.encoder_cache.hits,
        "encoder_cache_misses": llm.encoder_cache.misses,
        "peak_memory_gb": round(peak_memory_gb(llm.device), 3),
        "weights_gb": round(llm.model.weight_bytes / (1 << 30), 4),  # this rank's (int8 layers as stored)
        "quantization": llm.model.quantization,
    }


def format_summary(perf: dict) -> str:
    """A few human lines of perf_summary's numbers."""
    def pct(d: dict, scale: float = 1.0, unit: str = "s") -> str:
        return " / ".join(f"{d[k] * scale:.3g}" for k in ("p50", "p90", "p99")) + f" {unit}" if d else "n/a"

    return "\n".join([
        f"requests {perf['requests']} in {perf['wall_s']:.2f} s: {perf['requests_per_s']:.2f} req/s, "
        f"{perf['output_tokens']} output tokens at {perf['output_tokens_per_s']:.1f} tok/s",
        f"time to first token p50/p90/p99: {pct(perf['ttft_s'])}",
        f"time per output token p50/p90/p99: {pct(perf['tpot_s'], 1e3, 'ms')}",
        f"vision encoder {perf['vision_encoder_s']:.3f} s, prefill {perf['prefill_s']:.3f} s, "
        f"decode {perf['decode_s']:.3f} s ({perf['decode_tokens_per_s'] or 0:.1f} tok/s)",
        "step profile (host s): " + ", ".join(f"{k} {v:.3f}" for k, v in perf["step_profile_s"].items()),
        f"KV blocks peak {perf['kv_blocks_peak_used']} of {perf['kv_blocks_total']}, "
        f"prefix-cache hits {perf['cached_prompt_tokens']} of {perf['prompt_tokens']} prompt tokens, "
        f"preemptions {perf['preemptions']}, peak memory {perf['peak_memory_gb']:.2f} GiB",
        f"weights {perf['weights_gb']:.3f} GiB per rank (quantization: {perf['quantization']})",
        *([f"start-up {s['total']:.2f} s before the first request (imports {s['imports']:.2f} s, load "
           f"{s['load']:.2f} s; meanwhile {s.get('media_prefetched', 0.0):.2f} s of media prepared)"]
          if (s := perf.get("startup_s")) else []),
    ])
