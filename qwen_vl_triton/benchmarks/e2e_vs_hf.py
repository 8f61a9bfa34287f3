"""Our engine against transformers' generate on the same random-weight checkpoint and requests.

    python benchmarks/e2e_vs_hf.py                       # CPU-sized model (hidden 1024, 8 layers)
    python benchmarks/e2e_vs_hf.py --preset qwen2.5-vl-7b --requests 64   # on a GPU

Requests look like a server's: different prompt lengths and one image each, from 224x224 to 640x480,
`--max_tokens` output tokens each (EOS ignored so both sides generate the same count). transformers
gets them as one left-padded batch (its static batching); our engine gets them all at once
(continuous batching, paged KV). Each side runs in its own process so that peak memory (GPU
allocated, or the process's peak resident set on CPU) is its own. Our side's time includes
preprocessing the images; transformers' side gets the preprocessed tensors.

A third process times the floor: the language model's matrix products alone for the work our side
did (its prefill tokens, then one decode row per request per output token) on random weights of
the same shapes. transformers' time over it caps what any schedule could gain on this device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qwen_vl_triton.benchmarks import e2e_peers
from qwen_vl_triton.benchmarks.workloads import PRESETS, checkpoint_for, make_requests


def peak_memory_gb(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / (1 << 30)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def run_ours(args) -> dict:
    from qwen_vl_triton.engine.llm import LLM
    from qwen_vl_triton.engine.sampling import SamplingParams

    prompts = make_requests(args.requests)
    llm = LLM(args.checkpoint, dtype=args.dtype, device=args.device, kv_cache_gb=args.kv_cache_gb,
              max_batch_size=args.requests)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(make_requests(1), SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    prefilled = llm.stats.prefill.tokens
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - started
    tokens = sum(o.completion_tokens for o in outputs)
    return {"side": "ours", "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "peak_memory_gb": peak_memory_gb(args.device), "first_tokens": outputs[0].outputs[0].token_ids[:8],
            "prefill_tokens": llm.stats.prefill.tokens - prefilled}


def run_gemm_floor(args) -> dict:
    """Seconds the language model's matrix products alone take for our side's work: a prefill of
    --prefill_tokens tokens and --max_tokens decode steps of --requests rows through every layer
    (q/k/v, o, gate/up, down; random weights of the preset's shapes). No schedule can beat it."""
    import torch
    import torch.nn.functional as F

    from qwen_vl_triton.modeling.config import load_config

    t = load_config(args.checkpoint).text
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    kv = t.num_kv_heads * t.head_dim
    weights = [torch.randn(n, k, generator=g).to(args.device, dtype) for n, k in (
        (t.num_heads * t.head_dim + 2 * kv, t.hidden_size), (t.hidden_size, t.num_heads * t.head_dim),
        (2 * t.intermediate_size, t.hidden_size), (t.hidden_size, t.intermediate_size))]

    def forward(rows: int, reps: int) -> float:
        """Median seconds of `rows` tokens through every layer's four products over `reps` passes."""
        inputs = [torch.randn(rows, w.shape[1], generator=g).to(args.device, dtype) for w in weights]

        def layer() -> None:
            for a, w in zip(inputs, weights, strict=True):
                F.linear(a, w)

        layer()  # warm-up
        times = []
        for _ in range(reps):
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(t.num_layers):
                layer()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    prefill_s = forward(args.prefill_tokens, 3)
    decode_s = forward(args.requests, 9) * args.max_tokens
    return {"side": "floor", "prefill_s": prefill_s, "decode_s": decode_s, "wall_s": prefill_s + decode_s}


def run_transformers(args) -> dict:
    import torch
    import transformers

    from qwen_vl_triton.engine.llm import LLM

    # Our preprocessing gives both sides the same token ids and pixels; LLM is used only for that.
    prep = LLM(args.checkpoint, dtype="float32", device="cpu", num_kv_blocks=64, max_batch_size=1)
    prepared = [(r.ids, r.media) for r in map(prep.preprocessor.prepare, make_requests(args.requests))]
    image_token, pad = prep.config.image_token_id, prep.config.bos_token_id or 0
    del prep
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype)
    model = model.to(args.device).eval()
    width = max(len(ids) for ids, _ in prepared)
    input_ids = torch.full((len(prepared), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, (ids, _) in enumerate(prepared):  # left padding, as batched generation needs
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    media = [m for _, ms in prepared for m in ms]
    inputs = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=(input_ids == image_token).long(),
                  pixel_values=torch.cat([m.pixel_values for m in media]).to(model.dtype),
                  image_grid_thw=torch.tensor([m.grid for m in media]))
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    with torch.no_grad():
        model.generate(**{k: v[:1] for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")},
                       max_new_tokens=2, do_sample=False)  # warm-up (text only)
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                             do_sample=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    tokens = (out.shape[1] - width) * out.shape[0]
    return {"side": "transformers", "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "peak_memory_gb": peak_memory_gb(args.device), "first_tokens": out[0, width:width + 8].tolist()}


def _side(side: str, checkpoint: Path, requests: int, max_tokens: int, dtype: str, device: str,
          kv_cache_gb: float, *extra: str) -> dict:
    """Run one side in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--side", side, "--checkpoint", str(checkpoint), "--requests", str(requests),
           "--max_tokens", str(max_tokens), "--dtype", dtype, "--device", device, "--kv_cache_gb", str(kv_cache_gb),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{side} side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(preset: str, requests: int, max_tokens: int, dtype: str, device: str, kv_cache_gb: float) -> dict:
    """Run both sides in fresh processes; returns {"ours": ..., "transformers": ..., "speedup": ...}."""
    checkpoint = checkpoint_for(preset, dtype)
    results = {}
    for side in ("ours", "transformers"):
        results[side] = _side(side, checkpoint, requests, max_tokens, dtype, device, kv_cache_gb)
        print(f"  {side:12s} {results[side]['output_tokens_per_s']:9.1f} output tok/s  "
              f"wall {results[side]['wall_s']:.2f} s  peak memory {results[side]['peak_memory_gb']:.2f} GiB",
              flush=True)
    floor = _side("floor", checkpoint, requests, max_tokens, dtype, device, kv_cache_gb,
                  "--prefill_tokens", str(results["ours"]["prefill_tokens"]))
    results["gemm_floor_s"] = floor["wall_s"]
    results["speedup_cap"] = results["transformers"]["wall_s"] / floor["wall_s"]
    print(f"  LLM matmuls alone for our side's work: {floor['wall_s']:.2f} s (prefill {floor['prefill_s']:.2f} s, "
          f"decode {floor['decode_s']:.2f} s): no schedule beats {results['speedup_cap']:.2f}x transformers",
          flush=True)
    results["speedup"] = results["ours"]["output_tokens_per_s"] / results["transformers"]["output_tokens_per_s"]
    results["memory_ratio"] = results["ours"]["peak_memory_gb"] / results["transformers"]["peak_memory_gb"]
    results["same_first_tokens"] = results["ours"]["first_tokens"] == results["transformers"]["first_tokens"]
    print(f"  ours / transformers: {results['speedup']:.2f}x output tokens/s, "
          f"{results['memory_ratio']:.2f}x peak memory", flush=True)
    return results


def run(ctx) -> None:
    """`make bench` entry: the CPU preset on CPU, then the whole-process comparison with transformers
    and vLLM-CPU (benchmarks/e2e_peers.py); Qwen2.5-VL-7B shapes at batch 64 on a GPU."""
    on_gpu = ctx.device.type == "cuda"
    preset, requests, dtype = ("qwen2.5-vl-7b", 64, "bfloat16") if on_gpu else ("cpu-small", 16, "float32")
    res = compare(preset, requests, 64, dtype, ctx.device.type, kv_cache_gb=16.0 if on_gpu else 1.0)
    for side in ("transformers", "ours"):
        r = res[side]
        row = ctx.record("e2e", "generate", f"{preset} x{requests} req x64 tok", dtype,
                         "ours (engine)" if side == "ours" else "transformers generate", r["wall_s"] * 1e3,
                         note=f"{r['output_tokens_per_s']:.1f} tok/s, peak {r['peak_memory_gb']:.2f} GiB")
        if side == "ours":
            row["speedup_vs_baseline"] = round(res["speedup"], 3)
            row["memory_vs_baseline"] = round(res["memory_ratio"], 3)
    ctx.record("e2e", "generate", f"{preset} x{requests} req x64 tok", dtype, "floor: LLM matmuls alone",
               res["gemm_floor_s"] * 1e3, note=f"caps ours at {res['speedup_cap']:.2f}x transformers")
    if not on_gpu:  # the whole-process comparison with transformers and vLLM's CPU build
        e2e_peers.run(ctx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu-small", help="model shapes (default: %(default)s)")
    p.add_argument("--requests", type=int, default=16, help="requests in the batch (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=64, help="output tokens per request (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--kv_cache_gb", type=float, default=1.0, help="our engine's KV cache (default: %(default)s)")
    p.add_argument("--side", choices=["ours", "transformers", "floor"], help=argparse.SUPPRESS)
    p.add_argument("--prefill_tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side is None:
        print(json.dumps(compare(args.preset, args.requests, args.max_tokens, args.dtype, args.device,
                                 args.kv_cache_gb), indent=1))
        return
    result = {"ours": run_ours, "transformers": run_transformers, "floor": run_gemm_floor}[args.side](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
