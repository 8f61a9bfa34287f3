"""Load benchmark of a running server, in the manner of MindIE's `benchmark` client.

Requests (one per dataset sample, cycled to --num_prompts) go to /v1/chat/completions at a
Poisson --request_rate (inf: all at once) with at most --concurrency in flight. Each is timed by
the client: time to first token (TTFT), time per output token after the first (TPOT), the gaps
between streamed chunks (ITL) and end-to-end latency. Under --save_path it writes

    records.jsonl   one line per request (tokens, times, text, error)
    summary.json    the numbers of the printed table (GenerationSpeed = output tokens/s)
    latency.png     histograms of TTFT, TPOT, ITL and end-to-end latency

With --model_path, tools/benchmark.py runs the same requests through LLM.generate in its own
process instead: the offline baseline for the server's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from qwen_vl_triton.clients.client import RequestRecord, chat_payload, first_model, media_part, send_chat
from qwen_vl_triton.clients.datasets import Sample, load_dataset

PERCENTILES = (50, 90, 99)  # of the summary, the table and the plots

# Runs the requests: (records in request order, wall seconds of the timed part).
Runner = Callable[[argparse.Namespace, list[Sample]], tuple[list[RequestRecord], float]]


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a benchmark over HTTP (tools/benchmark.py adds --model_path and the engine's)."""
    add = p.add_argument
    add("--url", default="http://127.0.0.1:1025", help="the server's base URL (default: %(default)s)")
    add("--model", help="model name to send (default: the first one /v1/models lists)")
    add("--dataset_type", choices=["textvqa", "videobench", "synthetic"], default="synthetic",
        help="textvqa: textvqa_val.jsonl; videobench: an Eval_QA folder; synthetic: generated images "
             "(default: %(default)s)")
    add("--dataset_path", help="the dataset file or folder (not needed for synthetic)")
    add("--num_prompts", type=int, default=100, help="requests to send; the dataset is cycled (default: %(default)s)")
    add("--concurrency", type=int, default=64, help="requests in flight at most (default: %(default)s)")
    add("--request_rate", type=float, default=math.inf,
        help="mean requests per second, Poisson arrivals; inf sends all at once (default: %(default)s)")
    add("--max_output_len", type=int, default=256, help="max_tokens of each request (default: %(default)s)")
    add("--ignore_eos", action="store_true", help="generate exactly --max_output_len tokens per request")
    add("--temperature", type=float, default=0.0, help="0 = greedy, as MindIE's DoSampling False (default: 0)")
    add("--warmup", type=int, default=1, help="requests sent one by one before timing starts (default: %(default)s)")
    add("--stream", action=argparse.BooleanOptionalAction, default=True,
        help="stream responses (needed for TTFT / ITL; default: on)")
    add("--media_mode", choices=["path", "base64"], default="path",
        help="send dataset files as paths (the server must allow their folder with --allowed_media_dir) or "
             "as base64 data URIs (default: %(default)s; synthetic images are always base64)")
    add("--max_pixels", type=int, help="per-request max_pixels for each image / video frame")
    add("--min_pixels", type=int, help="per-request min_pixels")
    add("--fps", type=float, help="per-request video sampling rate")
    add("--nframes", type=int, help="per-request video frame count")
    add("--image_size", default="224x224", help="synthetic image size HxW (default: %(default)s)")
    add("--seed", type=int, default=0, help="seed of the arrival times (default: %(default)s)")
    add("--timeout", type=float, default=600.0, help="seconds per request (default: %(default)s)")
    add("--save_path", type=Path, help="folder for records.jsonl, summary.json and latency.png")


def media_options(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """qwen-vl-utils controls from the flags, for one medium of `kind`."""
    names = ("max_pixels", "min_pixels") + (("fps", "nframes") if kind == "video" else ())
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def sample_content(sample: Sample, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The user message's parts: media in order, then the text."""
    parts = [media_part(kind, src, media_options(args, kind), as_base64=args.media_mode == "base64")
             for kind, src in sample.media]
    return parts + [{"type": "text", "text": sample.text}]


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    """Throughput and latency percentiles of a run (seconds in the records, ms in the summary)."""
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)

    def dist(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        ms = np.asarray(values, dtype=float) * 1e3
        d = {f"p{q}": round(float(np.percentile(ms, q)), 3) for q in PERCENTILES}
        d["mean"] = round(float(ms.mean()), 3)
        return d

    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": round(duration_s, 3),
        "request_throughput_rps": round(len(ok) / duration_s, 4) if duration_s else 0.0,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "output_throughput_tps": round(out_tokens / duration_s, 3) if duration_s else 0.0,  # GenerationSpeed
        "ttft_ms": dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": dist([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": dist([x for r in ok for x in r.itl_s]),
        "e2e_ms": dist([r.latency_s for r in ok]),
        "errors": sorted({r.error for r in records if r.error})[:10],
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a text table (MindIE's names in brackets)."""
    rows = [
        ("requests (completed / failed)", f"{summary['completed']} / {summary['failed']}"),
        ("duration", f"{summary['duration_s']:.2f} s"),
        ("request throughput", f"{summary['request_throughput_rps']:.3f} req/s"),
        ("output tokens/s [GenerationSpeed]", f"{summary['output_throughput_tps']:.2f}"),
        ("input / output tokens", f"{summary['input_tokens']} / {summary['output_tokens']}"),
    ]
    lines = [f"{name:<36}{value}" for name, value in rows]
    columns = ["mean", *(f"p{q}" for q in PERCENTILES)]
    lines.append(f"{'latency (ms)':<36}" + "".join(f"{c:>10}" for c in columns))
    for key, name in (("ttft_ms", "TTFT [FirstTokenTime]"), ("tpot_ms", "TPOT [DecodeTime]"), ("itl_ms", "ITL"),
                      ("e2e_ms", "E2E latency")):
        d = summary[key]
        cells = "".join(f"{d[k]:>10.2f}" if k in d else f"{'-':>10}" for k in columns)
        lines.append(f"{name:<36}{cells}")
    for error in summary["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def plot_latencies(records: list[RequestRecord], path: Path) -> None:
    """Histograms of TTFT, TPOT, ITL and end-to-end latency (ms) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    series = [("TTFT", [r.ttft_s for r in ok if r.ttft_s is not None]),
              ("TPOT", [r.tpot_s for r in ok if r.tpot_s is not None]),
              ("ITL", [x for r in ok for x in r.itl_s]),
              ("end-to-end latency", [r.latency_s for r in ok])]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series, strict=True):
        ms = np.asarray(values, dtype=float) * 1e3
        if ms.size:
            ax.hist(ms, bins=min(50, max(5, ms.size // 4)), color="tab:blue", alpha=0.8)
            for q, style in zip(PERCENTILES, ("-", "--", ":"), strict=True):
                ax.axvline(np.percentile(ms, q), color="tab:red", linestyle=style, label=f"p{q}")
            ax.legend()
        ax.set_title(f"{name} ({ms.size} values)")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_benchmark(args: argparse.Namespace, samples: list[Sample]) -> tuple[list[RequestRecord], float]:
    """Send the requests to the server at --url; (records in request order, wall seconds of the timed part)."""
    return asyncio.run(_send_requests(args, samples))


async def _send_requests(args: argparse.Namespace, samples: list[Sample]) -> tuple[list[RequestRecord], float]:
    """`run_benchmark`'s requests: the warm-up one by one, then Poisson arrivals with --concurrency in flight."""
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:
        model = args.model or await first_model(client, args.url)
        contents = [sample_content(s, args) for s in samples]

        def payload(i: int) -> dict[str, Any]:
            return chat_payload(model, contents[i % len(contents)], args.max_output_len, args.stream,
                                args.temperature, args.ignore_eos)

        for i in range(args.warmup):
            warm = await send_chat(client, args.url, payload(i), RequestRecord(-1, "warmup"), args.timeout)
            if not warm.success:
                raise RuntimeError(f"warmup request failed: {warm.error}")

        rng = np.random.default_rng(args.seed)
        n = args.num_prompts
        if math.isinf(args.request_rate):
            arrivals = np.zeros(n)
        else:
            arrivals = np.cumsum(rng.exponential(1.0 / args.request_rate, size=n))
            arrivals -= arrivals[0]
        gate = asyncio.Semaphore(args.concurrency)
        bar = tqdm(total=n, desc="requests", unit="req")
        started = time.perf_counter()

        async def one(i: int) -> RequestRecord:
            delay = arrivals[i] - (time.perf_counter() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                sample = samples[i % len(samples)]
                record = RequestRecord(i, sample.id, start_s=time.perf_counter() - started)
                await send_chat(client, args.url, payload(i), record, args.timeout)
            bar.update(1)
            return record

        records = await asyncio.gather(*(one(i) for i in range(n)))
        duration = time.perf_counter() - started
        bar.close()
    return list(records), duration


def save_results(records: list[RequestRecord], summary: dict[str, Any], save_path: Path) -> list[Path]:
    """Write records.jsonl, summary.json and latency.png under save_path; returns their paths."""
    save_path.mkdir(parents=True, exist_ok=True)
    records_path = save_path / "records.jsonl"
    with records_path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    summary_path = save_path / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    plot_path = save_path / "latency.png"
    plot_latencies(records, plot_path)
    return [records_path, summary_path, plot_path]


def measure(args: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    """Run the requests with `runner` (`run_benchmark`, or the engine in-process that tools/benchmark.py
    --model_path hands in: this package imports no engine); print the summary table, save the files;
    returns the summary."""
    if args.num_prompts < 1 or args.concurrency < 1 or args.max_output_len < 1:
        raise SystemExit("--num_prompts, --concurrency and --max_output_len must be >= 1")
    if args.request_rate <= 0:
        raise SystemExit("--request_rate must be > 0 (inf: all at once)")
    h, _, w = args.image_size.partition("x")
    samples = load_dataset(args.dataset_type, args.dataset_path,
                           args.num_prompts if args.dataset_type == "synthetic" else None, (int(h), int(w or h)))
    if not samples:
        raise SystemExit("the dataset has no samples")
    try:
        records, duration = runner(args, samples)
    except RuntimeError as e:  # server unreachable, warm-up request refused
        raise SystemExit(f"error: {e}") from None
    summary = summarize(records, duration)
    summary["config"] = {k: (str(v) if isinstance(v, Path) or (isinstance(v, float) and math.isinf(v)) else v)
                         for k, v in vars(args).items()}
    print(format_table(summary))
    if args.save_path is not None:
        for path in save_results(records, summary, args.save_path):
            print(f"wrote {path}")
    if not any(r.success for r in records):
        raise SystemExit(f"error: all {len(records)} requests failed (first: {records[0].error})")
    return summary
