"""Load-test a running server, like MindIE's `benchmark` client (see clients/benchmark.py).

    python tools/benchmark.py --url http://127.0.0.1:1025 --dataset_type textvqa \
        --dataset_path /data/textvqa/textvqa_val.jsonl --num_prompts 256 --concurrency 64 \
        --max_output_len 256 --save_path out/bench

Prints TTFT / TPOT / ITL / end-to-end latency percentiles and output tokens/s (GenerationSpeed);
with --save_path writes records.jsonl, summary.json and latency.png there. With --model_path
instead of --url the same requests run through LLM.generate in this process (max_batch_size =
--concurrency): the offline baseline for the server's numbers. The engine is imported only then,
and only here: clients/ speaks HTTP.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from qwen_vl_triton.clients import benchmark as clients_benchmark
from qwen_vl_triton.clients.benchmark import add_benchmark_arguments, measure, media_options, run_benchmark
from qwen_vl_triton.clients.client import RequestRecord
from qwen_vl_triton.clients.datasets import Sample
from qwen_vl_triton.engine.config import EngineConfig, add_engine_args

if TYPE_CHECKING:
    from qwen_vl_triton.engine.llm import LLM, Prompt


def add_engine_arguments(p: argparse.ArgumentParser, model_path_help: str, max_batch_size_help: str) -> None:
    """--model_path (the engine in this process instead of a server) and the engine's flags, which
    apply with --model_path only (a server has its own)."""
    p.add_argument("--model_path", help=model_path_help)
    add_engine_args(p, max_batch_size=max_batch_size_help)


def load_engine(args: argparse.Namespace, samples: list[Sample], max_batch_size: int) -> tuple[LLM, list[Prompt]]:
    """The engine on --model_path (max_batch_size unless --max_batch_size is given), and the samples
    as its prompts (the media controls of the flags)."""
    from qwen_vl_triton.engine.llm import LLM, Prompt
    from qwen_vl_triton.engine.media import Media

    llm = LLM(args.model_path, EngineConfig.from_args(args, max_batch_size=max_batch_size))
    prompts = [Prompt(s.text, [Media(src, kind, media_options(args, kind)) for kind, src in s.media])
               for s in samples]
    return llm, prompts


def run_offline(args: argparse.Namespace, samples: list[Sample]) -> tuple[list[RequestRecord], float]:
    """The benchmark's requests through LLM.generate in this process (warmup included, untimed)."""
    from qwen_vl_triton.engine.sampling import SamplingParams

    llm, prompts = load_engine(args, samples, args.concurrency)
    params = SamplingParams(max_tokens=args.max_output_len, temperature=args.temperature, ignore_eos=args.ignore_eos)
    if args.warmup:
        llm.generate([prompts[i % len(prompts)] for i in range(args.warmup)], params)
    chosen = [prompts[i % len(prompts)] for i in range(args.num_prompts)]
    started = time.perf_counter()
    outputs = llm.generate(chosen, params, progress=True)
    duration = time.perf_counter() - started
    records = []
    for i, out in enumerate(outputs):
        sample = out.outputs[0]  # n is 1 here
        times = sample.token_times
        records.append(RequestRecord(i, samples[i % len(samples)].id, success=True, prompt_tokens=out.prompt_tokens,
                                     output_tokens=len(sample.token_ids), ttft_s=out.ttft_s, latency_s=out.latency_s,
                                     itl_s=[b - a for a, b in zip(times, times[1:], strict=False)], text=sample.text,
                                     finish_reason=sample.finish_reason))
    return records, duration


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (over HTTP, or offline with --model_path); returns the summary."""
    p = argparse.ArgumentParser(description=clients_benchmark.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_benchmark_arguments(p)
    add_engine_arguments(p, "no server: drive the engine in this process (LLM.generate) on the same requests, "
                            "with max_batch_size = --concurrency: the offline baseline for the server's numbers",
                         "--concurrency")
    args = p.parse_args(argv)
    return measure(args, run_offline if args.model_path else run_benchmark)


if __name__ == "__main__":
    main()
